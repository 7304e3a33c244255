"""Answer extraction and SQuAD-style metrics (exact match, token F1, max over aliases).

Answer extraction: the first non-empty line of the generation, with a leading
``Answer:`` label, surrounding quotes/asterisks and one trailing period removed. It is
NOT cut at the first comma (that would truncate dates such as "August 25, 1963").
"""

from __future__ import annotations

import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_LABEL = re.compile(r"^\s*(?:final\s+)?answer\s*[:：]\s*", re.IGNORECASE)


def extract_answer(generation: str) -> str:
    lines = [ln.strip() for ln in generation.strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    ans = _LABEL.sub("", lines[0]).strip().strip("*\"'`").strip()
    return ans[:-1] if ans.endswith(".") else ans


def normalize_answer(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
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
