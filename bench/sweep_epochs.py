"""Epoch sweep: how many epochs a rank-2 LoRA needs to store a document's facts.

For each epoch count, every document retrieved by the questions is trained into its
own adapter store; then one vLLM engine answers the questions in parametric mode from
each store (and closed-book once, as the floor). Prints a table and writes JSON.

    python bench/sweep_epochs.py --corpus C --questions Q --epochs 1,3,10 --work-dir runs/sweep
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from pathlib import Path

from common import run_metadata

from prag_vllm.adapters import AdapterStore
from prag_vllm.augment import load_augmentations
from prag_vllm.corpus import load_corpus, save_corpus_jsonl
from prag_vllm.fileio import atomic_write_json
from prag_vllm.generate import EngineConfig, VLLMEngine
from prag_vllm.models import DEFAULT_MODEL, resolve_model
from prag_vllm.parameterize import DocumentTrainer, TrainConfig, parameterize_corpus
from prag_vllm.pipeline import ParametricRAG, load_questions, summarize
from prag_vllm.retrieve import BM25Retriever

logger = logging.getLogger("sweep_epochs")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--questions", required=True)
    ap.add_argument("--epochs", default="1,3,10")
    ap.add_argument("--work-dir", default="runs/sweep")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--limit", type=int, default=None, help="first N questions")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    work = Path(args.work_dir)
    epochs = [int(e) for e in args.epochs.split(",")]
    model = resolve_model(args.model)
    docs = load_corpus(args.corpus)
    questions = load_questions(args.questions)[: args.limit]
    retriever = BM25Retriever.build_or_load(docs, work / "index")
    needed = {h.doc.id for hits in retriever.retrieve([q.question for q in questions], args.top_k) for h in hits}
    sub = [d for d in docs if d.id in needed]
    sub_path = work / "retrieved_corpus.jsonl"
    save_corpus_jsonl(sub, sub_path)
    logger.info("%d questions retrieve %d distinct documents", len(questions), len(sub))
    subprocess.run([sys.executable, "-m", "prag_vllm.cli", "augment", "--work-dir", str(work), "--corpus",
                    str(sub_path), "--model", args.model], check=True)
    augs = load_augmentations(work / "augmented.jsonl")
    train_s = {}
    trainer = None
    for e in epochs:
        cfg = TrainConfig(epochs=e)
        trainer = trainer or DocumentTrainer(model, cfg)
        trainer.cfg = cfg
        t0 = time.perf_counter()
        parameterize_corpus(sub, augs, AdapterStore(work / f"epochs-{e}"), model, cfg, trainer=trainer)
        train_s[e] = time.perf_counter() - t0
    del trainer
    engine = VLLMEngine(EngineConfig(model=str(model)))
    results = []
    closed = ParametricRAG(retriever, AdapterStore(work / "none"), engine, augs, args.top_k).answer_file(
        questions, work / "closed-book.jsonl", ["closed-book"])
    for t in summarize(closed):
        results.append({"epochs": 0, **t})
    for e in epochs:
        rag = ParametricRAG(retriever, AdapterStore(work / f"epochs-{e}"), engine, augs, args.top_k)
        rows = rag.answer_file(questions, work / f"parametric-epochs-{e}.jsonl", ["parametric"])
        for t in summarize(rows):
            trained = train_s[e] > 0.5  # 0 when every adapter was already in the store (reused)
            results.append({"epochs": e, "train_s_per_doc": train_s[e] / len(sub) if trained else None, **t})
    print("\n| epochs | mode | questions | EM | F1 | train s/doc |\n|---:|---|---:|---:|---:|---:|")
    for r in results:
        cost = f"{r['train_s_per_doc']:.1f}" if r.get("train_s_per_doc") else ("reused" if r["epochs"] else "-")
        print(f"| {r['epochs']} | {r['mode']} | {r['questions']} | {r['em']:.3f} | {r['f1']:.3f} | {cost} |")
    atomic_write_json(work / "sweep.json", {**run_metadata(), "model": args.model, "documents": len(sub),
                                            "results": results})
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
