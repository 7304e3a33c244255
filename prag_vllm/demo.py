"""``prag demo``: the whole pipeline on an invented corpus, in all five modes.

One process, one vLLM engine: index the corpus, augment it with the engine, train one
LoRA per document with the batched trainer while the engine sits idle, then answer every
question in every mode with the same engine (what ``prag eval`` does, on a fixed corpus).
Every step resumes: a re-run reuses the index, the augmentations log, the adapter store
and the answers file, and starts no engine when nothing is left to do.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import nullcontext
from pathlib import Path

from prag_vllm import logs
from prag_vllm.demo_data import DOCUMENTS, QUESTIONS
from prag_vllm.fileio import atomic_write_json, atomic_write_text, read_jsonl
from prag_vllm.merge import DEFAULT_MERGE_POLICY
from prag_vllm.modes import MODES
from prag_vllm.parameterize import TrainConfig
from prag_vllm.workspace import Workspace

logger = logging.getLogger(__name__)

TOP_K = 3
"""Documents retrieved per question."""


def _write_inputs(ws: Workspace) -> tuple[Path, Path]:
    """The invented corpus and its questions, as JSON Lines in the workspace."""
    ws.root.mkdir(parents=True, exist_ok=True)
    corpus, questions = ws.root / "corpus.jsonl", ws.root / "questions.jsonl"
    atomic_write_text(corpus, "".join(json.dumps(d) + "\n" for d in DOCUMENTS))
    atomic_write_text(questions, "".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return corpus, questions


def run_demo(ws: Workspace, model: str, train: TrainConfig | None = None, dtype: str = "auto",
             max_model_len: int = 4096, answer: bool = True, model_dir: str | os.PathLike | None = None,
             engine=None, merge_policy: str = DEFAULT_MERGE_POLICY) -> int:
    """All steps; with ``answer=False`` only the offline ones (what ``make serve`` needs).

    ``train``: the training recipe (default: :class:`TrainConfig`'s); ``model_dir``: the
    model's local directory when already resolved (else ``model`` is resolved, fetched
    on first use); ``engine``: an engine to use instead of starting vLLM on first need
    (tests)."""
    from prag_vllm.augment import augment_corpus, load_augmentations
    from prag_vllm.cliargs import LazyEngine
    from prag_vllm.corpus import load_corpus
    from prag_vllm.generate import EngineConfig
    from prag_vllm.models import resolve_model
    from prag_vllm.pipeline import ParametricRAG, load_questions
    from prag_vllm.retrieve.factory import RetrieverConfig, build_retriever
    from prag_vllm.training.driver import parameterize_batched

    t0 = time.perf_counter()
    train = train or TrainConfig()
    n = 4 if answer else 3
    corpus_path, questions_path = _write_inputs(ws)
    docs = load_corpus(corpus_path)
    logs.step(f"[1/{n}] index: {len(docs)} invented documents (BM25){logs.details_hint()}")
    retriever = build_retriever(RetrieverConfig(kind="bm25", index_dir=str(ws.index_dir)), docs)
    model_dir = Path(model_dir) if model_dir is not None else resolve_model(model)
    engine_cfg = EngineConfig(model=str(model_dir), dtype=dtype, max_model_len=max_model_len, enable_lora=answer)
    with LazyEngine(engine_cfg) if engine is None else nullcontext(engine) as engine:
        augs = load_augmentations(ws.augmented)
        todo = [d for d in docs if d.id not in augs]
        logs.step(f"[2/{n}] augment: " + (f"rewrites and QA pairs for {len(todo)} documents" if todo else
                                          f"all {len(docs)} documents done before")
                  + (f" ({len(docs) - len(todo)} done before)" if 0 < len(todo) < len(docs) else ""))
        if todo:
            if isinstance(engine, LazyEngine):
                engine.start()
            augs = augment_corpus(docs, engine, ws.augmented)
        store = ws.store(model_dir, train)
        logs.step(f"[3/{n}] parameterize: one rank-{train.rank} LoRA per document, recipe {train.recipe}, "
                  f"{train.epochs} epochs -> {store.root}")
        summary = parameterize_batched(docs, augs, store, model_dir, train)
        if summary["trained"]:
            logs.step(f"      trained {summary['trained']} adapters in {summary['seconds']:.0f} s")
        logs.quiet_libraries()
        if not answer:
            logs.step(f"demo workspace ready in {ws.root} (index, augmentations, adapters) "
                      f"in {time.perf_counter() - t0:.0f} s")
            return 0
        answers = ws.root / "answers.jsonl"
        _set_aside_other_answers(answers, {"adapters": store.root.name, "merge_policy": merge_policy})
        questions = load_questions(questions_path)
        logs.step(f"[4/{n}] answer: {len(questions)} questions x {len(MODES)} modes, top-{TOP_K} -> {answers}")
        rag = ParametricRAG(retriever, store, engine, augs, default_k=TOP_K, merge_policy=merge_policy)
        rag.answer_file(questions, answers, list(MODES))
    print_results(ws, model, read_jsonl(answers), time.perf_counter() - t0)
    return 0


def _set_aside_other_answers(answers: Path, settings: dict) -> None:
    """Answers resume only under the settings they were made with (adapter set, merge policy,
    recorded beside them): answers of other settings are renamed aside, not reused or lost."""
    import hashlib

    side = answers.with_name("answers.settings.json")
    old = json.loads(side.read_text()) if side.is_file() else None
    if answers.is_file() and old != settings:
        digest = hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:8]
        kept = answers.with_name(f"answers-before-{digest}.jsonl")
        os.replace(answers, kept)
        logs.step(f"      answers made with other settings kept as {kept.name}")
    if old != settings:
        atomic_write_json(side, settings)


def print_results(ws: Workspace, model: str, rows: list[dict], seconds: float) -> None:
    """The table of the five modes and the parametric answers that only the adapters knew."""
    from prag_vllm.pipeline import format_table, summarize

    table = format_table(summarize(rows, list(MODES)))
    print(f"\nDemo: {len(DOCUMENTS)} invented documents, {len(QUESTIONS)} questions, model {model}, "
          f"top-k {TOP_K}, {seconds:.0f} s total\n")
    print(table)
    para = [r for r in rows if r["mode"] == "parametric"]
    closed = {r["id"]: r for r in rows if r["mode"] == "closed-book"}
    wins = [r for r in para if r.get("em") and not r["in_context"] and not closed[r["id"]].get("em")]
    print(f"\nParametric answers correct with no passage in the prompt (closed-book wrong): {len(wins)}/{len(para)}")
    for r in wins[:5]:
        print(f"  {r['question']} -> {r['answer']!r} (closed-book: {closed[r['id']]['answer']!r})")
    atomic_write_text(ws.root / "demo_table.md", table + "\n")
