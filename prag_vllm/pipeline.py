"""Batch QA: Retrieve -> Update (merge) -> Generate for a file of questions, resumable.

Every (question, mode) becomes one request; requests go to vLLM in chunks, each
parametric request with the merged adapter of its own retrieved documents. Retrieved
documents that have no adapter are shown in context instead (and reported as such).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from prag_vllm.adapters import AdapterStore
from prag_vllm.audit import AnswerAudit, count
from prag_vllm.augment import Augmentation
from prag_vllm.errors import InputError
from prag_vllm.fileio import JsonlAppender, read_jsonl
from prag_vllm.merge import DEFAULT_MERGE_POLICY, MergedAdapterCache
from prag_vllm.metrics import best_scores, extract_answer
from prag_vllm.modes import MODES, get_mode
from prag_vllm.retrieve import DEFAULT_TOP_K, Retriever, check_top_k

logger = logging.getLogger(__name__)


@dataclass
class Question:
    """One row of a questions file."""

    id: str
    question: str
    answers: list[str] = field(default_factory=list)
    """Gold answers/aliases, if known (enables EM/F1 in the output)."""
    mode: str | None = None
    """Per-row mode; None means the modes given on the command line."""
    k: int | None = None
    """Per-row top-k; None means the default."""
    type: str | None = None
    """The dataset's question sub-type (HotpotQA: bridge/comparison; 2Wiki: comparison, ...)."""


def load_questions(path: str | os.PathLike) -> list[Question]:
    """Read questions JSON Lines: ``question`` required; ``id``, ``answers``/``answer``, ``mode``, ``k``, ``type`` optional."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"questions file not found: {path}")
    rows = read_jsonl(path)
    if not rows:
        raise InputError(f"questions file is empty: {path}")
    return questions_from_rows(rows, str(path))


def questions_from_rows(rows: list, where: str) -> list[Question]:
    """Validate question rows (as in a questions JSON Lines file) into :class:`Question` objects."""
    out, seen = [], set()
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise InputError(f"{where}: row {n} is not a JSON object")
        q = row.get("question")
        if not isinstance(q, str) or not q.strip():
            raise InputError(f"{where}: row {n} has no 'question'")
        qid = str(row.get("id", n))
        if qid in seen:
            raise InputError(f"{where}: row {n}: duplicate id {qid!r}")
        seen.add(qid)
        answers = row.get("answers", row.get("answer"))
        answers = [] if answers is None else [str(a) for a in answers] if isinstance(answers, list) else [str(answers)]
        mode = row.get("mode")
        if mode is not None:
            get_mode(mode)
        k = row.get("k")
        if k is not None:
            try:
                check_top_k(k)
            except InputError as exc:
                raise InputError(f"{where}: row {n}: {exc}") from None
        qtype = row.get("type")
        out.append(Question(id=qid, question=q.strip(), answers=answers, mode=mode, k=k,
                            type=str(qtype) if qtype is not None else None))
    return out


@dataclass
class Prepared:
    """A request ready for vLLM."""

    messages: list[dict]
    adapter: Path | None
    retrieved: list[str]
    parametric: list[str]
    in_context: list[str]
    prep_seconds: float


class ParametricRAG:
    """The Retrieve-Update-Generate loop over one retriever, adapter store and engine."""

    def __init__(self, retriever: Retriever, store: AdapterStore, engine, augmentations: dict[str, Augmentation] | None = None,
                 default_k: int = DEFAULT_TOP_K, merge_policy: str = DEFAULT_MERGE_POLICY):
        self.retriever = retriever
        self.store = store
        self.merged = MergedAdapterCache(store, policy=merge_policy)
        self.engine = engine
        self.augmentations = augmentations or {}
        self.default_k = check_top_k(default_k)

    def prepare(self, question: str, mode_name: str, k: int | None = None) -> Prepared:
        t0 = time.perf_counter()
        mode = get_mode(mode_name)
        k = check_top_k(k if k is not None else self.default_k)
        hits = self.retriever.retrieve([question], k)[0] if mode.retrieves else []
        docs = [h.doc for h in hits]
        parametric = [d.id for d in docs if self.store.has(d.id)] if mode.parametric else []
        adapter = self.merged.get(parametric) if parametric else None
        in_context = docs if mode.name != "parametric" else [d for d in docs if d.id not in parametric]
        messages = mode.messages(question, in_context, self.augmentations)
        return Prepared(messages, adapter, [d.id for d in docs], parametric, [d.id for d in in_context],
                        time.perf_counter() - t0)

    def answer_file(self, questions: list[Question], out_path: str | os.PathLike, modes: list[str],
                    batch_size: int = 64, max_tokens: int = 32) -> list[dict]:
        """Answer every (question, mode) not yet in ``out_path``; return all rows of ``out_path``."""
        from tqdm.auto import tqdm

        for m in modes:
            get_mode(m)
        out_path = Path(out_path)
        done = {(r["id"], r["mode"]) for r in read_jsonl(out_path, tolerate_torn_tail=True)} if out_path.is_file() else set()
        todo = [(q, m) for q in questions for m in ([q.mode] if q.mode else modes) if (q.id, m) not in done]
        if done:
            logger.info("answer: %d rows already in %s, resuming with %d", len(done), out_path, len(todo))
        # one stream of batches, but a batch never mixes modes: latency_s is then per mode
        order = {m: i for i, m in enumerate(MODES)}
        todo.sort(key=lambda item: order[item[1]])
        chunks, start = [], 0
        for end in range(1, len(todo) + 1):
            if end == len(todo) or end - start == batch_size or todo[end][1] != todo[start][1]:
                chunks.append(todo[start:end])
                start = end
        audit = AnswerAudit.for_tokenizer(getattr(self.engine, "tokenizer", None)) if todo else AnswerAudit()
        with JsonlAppender(out_path) as log, tqdm(total=len(todo), desc="answer", unit="q") as bar:
            for chunk in chunks:
                prepared = [self.prepare(q.question, m, q.k) for q, m in chunk]
                t0 = time.perf_counter()
                gens = self.engine.generate([p.messages for p in prepared], [p.adapter for p in prepared],
                                            max_tokens=max_tokens)
                gen_each = (time.perf_counter() - t0) / len(chunk)
                rows = []
                for (q, m), p, g in zip(chunk, prepared, gens):
                    answer = extract_answer(g.text)
                    row = {"id": q.id, "question": q.question, "mode": m, "k": q.k or self.default_k,
                           "answer": answer, "generation": g.text, "retrieved": p.retrieved,
                           "parametric": p.parametric, "in_context": p.in_context,
                           "prompt_tokens": g.prompt_tokens, "prep_s": round(p.prep_seconds, 5),
                           "latency_s": round(p.prep_seconds + gen_each, 5),
                           **audit.check(g.text, g.token_ids, getattr(g, "finish_reason", None))}
                    if q.type is not None:
                        row["type"] = q.type
                    if q.answers:
                        em, f1 = best_scores(answer, q.answers)
                        row.update(answers=q.answers, em=em, f1=f1)
                    rows.append(row)
                log.write_many(rows)
                bar.update(len(chunk))
        return read_jsonl(out_path, tolerate_torn_tail=True)


def summarize(rows: list[dict], modes: list[str] | None = None) -> list[dict]:
    """Per-mode mean EM, F1, latency and prompt tokens, in ``modes`` order."""
    modes = modes or [m for m in MODES if any(r["mode"] == m for r in rows)]
    table = []
    for m in modes:
        mine = [r for r in rows if r["mode"] == m]
        if not mine:
            continue
        scored = [r for r in mine if "em" in r]
        n = len(scored) or 1
        table.append({"mode": m, "questions": len(mine), "em": sum(r["em"] for r in scored) / n,
                      "f1": sum(r["f1"] for r in scored) / n,
                      "latency_s": sum(r["latency_s"] for r in mine) / len(mine),
                      "prompt_tokens": sum(r["prompt_tokens"] for r in mine) / len(mine), **count(mine)})
    return table


def format_table(table: list[dict]) -> str:
    lines = ["| mode | questions | EM | F1 | template leaks | hit max_tokens | s/question | prompt tokens |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for t in table:
        lines.append(f"| {t['mode']} | {t['questions']} | {t['em']:.3f} | {t['f1']:.3f} | {t.get('template_leaks', 0)} "
                     f"| {t.get('hit_max_tokens', 0)} | {t['latency_s']:.3f} | {t['prompt_tokens']:.0f} |")
    return "\n".join(lines)
