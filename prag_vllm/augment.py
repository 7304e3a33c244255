"""Document augmentation: n rewrites and m QA pairs per document, generated in batches.

All documents of a batch go to the LLM together (one vLLM call for the rewrites of the
batch, one for its QA pairs). QA output is parsed robustly (a JSON list, or
``Question: / Answer:`` lines); a document whose output does not parse is retried with
sampling, and after ``max_retries`` it is kept with no QA pairs and a logged warning:
one bad document never aborts the run. Results are appended per batch to a JSON Lines
log, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from prag_vllm.corpus import Document
from prag_vllm.fileio import JsonlAppender, read_jsonl

logger = logging.getLogger(__name__)

REWRITE_PROMPT = (
    "Rewrite the following passage in different words. Keep every name, place, number, date "
    "and technical term exactly as written, keep all of its facts, and add nothing new. "
    "Output only the rewritten passage.\n\nPassage:\n{passage}"
)
QA_PROMPT = (
    "Read the passage and write {m} different questions that the passage answers, each about a "
    "different fact, each with a short answer copied from the passage (a name, a place, a year or a "
    "few words, not a sentence). Every question must make sense on its own: name the person, place, "
    "organisation or work it asks about in full, never 'he', 'she', 'it', 'the city' or 'the novel'. "
    "Output only a JSON list in this format:\n"
    '[{{"question": "...", "answer": "..."}}, ...]\n\nPassage:\n{passage}'
)
PROMPT_VERSION = 3
"""Bumped when REWRITE_PROMPT, QA_PROMPT or the filters change (augmentation logs are keyed by it).
3: QA pairs must also name the document's subject and must not contain their answer (:func:`usable_qa`)."""


class ChatGenerator(Protocol):
    """Anything that completes a batch of chat conversations (the vLLM engine, a test fake)."""

    def chat(self, conversations: list[list[dict]], *, max_tokens: int, temperature: float = 0.0,
             seed: int | None = None) -> list[str]: ...


@dataclass
class AugmentConfig:
    """How documents are augmented."""

    n_rewrites: int = 1
    """Rewrites per document (the paper uses 1)."""
    n_qa: int = 3
    """Question-answer pairs per document (the paper uses 3)."""
    max_retries: int = 2
    """Re-generations (with sampling) of a document whose QA output does not parse."""
    batch_size: int = 32
    """Documents per LLM batch."""
    max_tokens: int = 384
    """Generation budget of one rewrite or one QA list."""
    seed: int = 0
    """Base seed of sampled generations."""
    distinct_answers: bool = False
    """One QA pair per fact: a pair whose answer an earlier pair of the document has is dropped
    (and the document asked again). Off by default: measured on the fictional benchmark it taught
    more facts but did not raise top-3 F1 (docs/recipes.md)."""


@dataclass
class Augmentation:
    """What augmentation produced for one document."""

    id: str
    rewrites: list[str] = field(default_factory=list)
    qa: list[dict] = field(default_factory=list)
    qa_failed: bool = False

    def to_dict(self) -> dict:
        return {"id": self.id, "rewrites": self.rewrites, "qa": self.qa, "qa_failed": self.qa_failed}


_QA_LINE = re.compile(r"(?:^|\n)\s*(?:\d+[.)]\s*)?(?:Q|Question)\s*\d*\s*[:.]\s*(.+?)\s*\n\s*(?:A|Answer)\s*\d*\s*[:.]\s*(.+?)\s*(?=\n|$)",
                      re.IGNORECASE)


def parse_qa(text: str, limit: int) -> list[dict]:
    """Extract up to ``limit`` {question, answer} pairs from LLM output; [] if none parse."""
    pairs: list[dict] = []
    start, end = text.find("["), text.rfind("]")
    if 0 <= start < end:
        try:
            data = json.loads(text[start:end + 1])
        except json.JSONDecodeError:
            data = None
        if isinstance(data, list):
            for item in data:
                if isinstance(item, dict):
                    q, a = item.get("question"), item.get("answer")
                    if isinstance(q, str) and isinstance(a, (str, int, float)) and q.strip() and str(a).strip():
                        pairs.append({"question": q.strip(), "answer": str(a).strip()})
    if not pairs:
        pairs = [{"question": q.strip(), "answer": a.strip().strip('"')} for q, a in _QA_LINE.findall(text)]
    seen, unique = set(), []
    for p in pairs:
        if p["question"].lower() not in seen:
            seen.add(p["question"].lower())
            unique.append(p)
    return unique[:limit]


def answer_in_passage(answer: str, passage: str) -> bool:
    """True if the answer's words occur in the passage in order (case, punctuation and articles
    ignored): QA pairs whose answer the passage does not contain teach the adapter nothing true."""
    from prag_vllm.metrics import normalize_answer

    ans = normalize_answer(answer)
    return bool(ans) and f" {ans} " in f" {normalize_answer(passage)} "


def title_words(title: str) -> list[str]:
    """The words that name a document's subject: its title's words of three or more characters,
    a parenthesised qualifier ("(film)") left out, as written."""
    return [w for w in re.sub(r"\([^)]*\)", " ", title).split() if len(w) >= 3]


def names_subject(question: str, doc: Document) -> bool:
    """True if the question names the document's subject: one of its :func:`title_words`
    occurs in it (compared normalized). Untitled documents always pass. A question that names
    nothing ("What is the name of the book?") teaches an adapter to give its one answer to any
    question."""
    from prag_vllm.metrics import normalize_answer

    words = {n for n in (normalize_answer(w) for w in title_words(doc.title)) if len(n) >= 3}
    return not words or bool(words & set(normalize_answer(question).split()))


def usable_qa(pair: dict, doc: Document) -> bool:
    """A QA pair worth training on: its answer occurs in the passage but not in the question, and
    the question names the document's subject."""
    q, a = pair["question"], pair["answer"]
    return answer_in_passage(a, doc.passage) and not answer_in_passage(a, q) and names_subject(q, doc)


_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


def keeps_numbers(original: str, rewrite: str) -> bool:
    """True if every number/date token of ``original`` also appears in ``rewrite``."""
    return set(_NUMBER.findall(original)) <= set(_NUMBER.findall(rewrite))


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _key(pair: dict, cfg: AugmentConfig) -> str:
    """What makes a QA pair new for its document: its question, or with ``distinct_answers`` its answer."""
    from prag_vllm.metrics import normalize_answer

    return normalize_answer(pair["answer"] if cfg.distinct_answers else pair["question"])


def augment_batch(docs: list[Document], llm: ChatGenerator, cfg: AugmentConfig) -> list[Augmentation]:
    """Augment one batch of documents with two batched LLM calls, plus retries (with sampling) of
    the documents with fewer than ``n_qa`` usable QA pairs; their pairs accumulate over the tries."""
    convs = [_user(REWRITE_PROMPT.format(passage=d.passage)) for d in docs for _ in range(cfg.n_rewrites)]
    rewrites = llm.chat(convs, max_tokens=cfg.max_tokens, temperature=0.7 if cfg.n_rewrites > 1 else 0.0,
                        seed=cfg.seed) if convs else []
    results = []
    for i, d in enumerate(docs):
        mine = [r.strip() for r in rewrites[i * cfg.n_rewrites:(i + 1) * cfg.n_rewrites] if r.strip()]
        kept = [r for r in mine if keeps_numbers(d.text, r)]
        if len(kept) < len(mine):
            logger.warning("document %r: dropped %d rewrite(s) that lost a number or date", d.id, len(mine) - len(kept))
        results.append(Augmentation(id=d.id, rewrites=kept))
    pending = list(range(len(docs))) if cfg.n_qa > 0 else []
    for attempt in range(cfg.max_retries + 1):
        if not pending:
            break
        outs = llm.chat([_user(QA_PROMPT.format(m=cfg.n_qa, passage=docs[i].passage)) for i in pending],
                        max_tokens=cfg.max_tokens, temperature=0.0 if attempt == 0 else 0.8,
                        seed=cfg.seed + attempt)
        still = []
        for i, out in zip(pending, outs):
            have = results[i].qa
            seen = {_key(p, cfg) for p in have}
            for p in parse_qa(out, 4 * cfg.n_qa):
                key = _key(p, cfg)
                if len(have) < cfg.n_qa and usable_qa(p, docs[i]) and key not in seen:
                    have.append(p)
                    seen.add(key)
            if len(have) < cfg.n_qa:  # too few usable pairs (usable_qa): asked again, with sampling
                still.append(i)
        pending = [i for i in still if attempt < cfg.max_retries or not results[i].qa]
    for i in pending:
        logger.warning("document %r: no usable QA pair after %d tries; training on its passages only",
                       docs[i].id, cfg.max_retries + 1)
        results[i].qa_failed = True
    return results


def load_augmentations(path: str | os.PathLike) -> dict[str, Augmentation]:
    """Read an augmentation log (later lines win); a missing file is an empty log."""
    path = Path(path)
    if not path.is_file():
        return {}
    out = {}
    for row in read_jsonl(path, tolerate_torn_tail=True):
        out[row["id"]] = Augmentation(id=row["id"], rewrites=list(row.get("rewrites", [])),
                                      qa=list(row.get("qa", [])), qa_failed=bool(row.get("qa_failed")))
    return out


def augment_corpus(docs: list[Document], llm: ChatGenerator, out_path: str | os.PathLike,
                   cfg: AugmentConfig | None = None) -> dict[str, Augmentation]:
    """Augment every document not yet in ``out_path``; returns all augmentations."""
    from tqdm.auto import tqdm

    cfg = cfg or AugmentConfig()
    done = load_augmentations(out_path)
    todo = [d for d in docs if d.id not in done]
    if len(todo) < len(docs):
        logger.info("augmentation: %d of %d documents already done, resuming", len(docs) - len(todo), len(docs))
    with JsonlAppender(out_path) as log, tqdm(total=len(todo), desc="augment", unit="doc") as bar:
        for start in range(0, len(todo), cfg.batch_size):
            batch = augment_batch(todo[start:start + cfg.batch_size], llm, cfg)
            log.write_many(a.to_dict() for a in batch)
            done.update({a.id: a for a in batch})
            bar.update(len(batch))
    return done
