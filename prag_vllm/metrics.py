"""Answer extraction and SQuAD-style metrics (exact match, token F1, max over aliases).

Answer extraction (:func:`extract_answer`): the first line of the generation that is
not empty once a leading label (``Answer:``, ``Final answer:``, ``The answer is``) is
removed, with surrounding quotes/asterisks and one trailing period stripped. It is NOT cut at the first comma, as
the paper's code does (that truncates dates such as "August 25, 1963" and names such as
"Paris, France").

Normalization (:func:`normalize_answer`, SQuAD / HotpotQA official): lower case, ASCII
punctuation removed, the articles a/an/the removed, whitespace collapsed. F1 is token
F1; when the prediction or the gold answer normalizes to yes/no/noanswer, F1 is 1 only
on an exact match (HotpotQA official). EM and F1 are each the maximum over the aliases.
"""

from __future__ import annotations

import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_LABEL = re.compile(r"^\s*(?:the\s+)?(?:final\s+)?answer[*_]*(?:\s+to\s+(?:the|this)\s+question)?"
                    r"(?:\s+is\b\s*[:：]?|\s*[:：])[*_]*\s*", re.IGNORECASE)
_PUNCTUATION = frozenset(string.punctuation)


def extract_answer(generation: str) -> str:
    """The short answer in a generation (see the module docstring); "" for an empty one."""
    for line in generation.splitlines():  # a bare "Answer:" line: the answer is on the next one
        ans = _LABEL.sub("", line.strip().lstrip("*_ ")).strip().strip("*\"'`").strip()
        if ans:
            return ans[:-1] if ans.endswith(".") else ans
    return ""


def normalize_answer(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction), normalize_answer(gold)
    if pred in {"yes", "no", "noanswer"} or ref in {"yes", "no", "noanswer"}:
        return float(pred == ref)
    p_tokens, r_tokens = pred.split(), ref.split()
    common = Counter(p_tokens) & Counter(r_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p_tokens), same / len(r_tokens)
    return 2 * precision * recall / (precision + recall)


def best_scores(prediction: str, answers: list[str]) -> tuple[float, float]:
    """(EM, F1), each the maximum over the gold aliases; (0, 0) when there is no gold."""
    if not answers:
        return 0.0, 0.0
    return max(exact_match(prediction, a) for a in answers), max(f1_score(prediction, a) for a in answers)
