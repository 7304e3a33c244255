"""The paper's Table 4 on vLLM, in one run: latency, batch throughput, LoRA ceiling, adapter readiness.

Over the first ``--questions`` questions of a QA file in its native format (default: the
shared HotpotQA sample, its paragraphs as the closed corpus, BM25 top-3), the real server
(``python -m serving``) is started three times on loopback with the default model:

* ``no-lora``: an engine without LoRA; closed-book requests (the bare question: the same
  short prompt parametric mode sends) give the ceiling;
* ``stock``: vLLM's stock CPU LoRA ops (``PRAG_STOCK_LORA_OPS=1``, zero-adapter guard on);
* ``prag``: this project's planned CPU LoRA ops (the default).

Against each, through the official ``openai`` client:

1. per-question latency, one request at a time, every mode (cold: each question's
   documents are merged and loaded when it is first asked in parametric mode); by default
   the modes of one question are asked in turn before the next question (``--order
   interleaved``), so that a shared machine's drift hits every mode alike;
2. batch throughput: all questions sent at once per mode (parametric: a distinct merged
   adapter per question, already merged by step 1);
3. document ids -> adapter ready: cold (from step 1) and cached (the same sets again).

vLLM's prefix cache is off in every server, so each prompt is computed in full and the
modes compare prompt lengths. Under the zero-adapter guard, the stock ops send every
request through vLLM's per-token op (~6 s per standard-RAG question), so the stock server
gets the first ``--stock-questions`` questions; the comparison table sets it against the
same questions on the other servers (``batch_subset``: the batch step over them).

Every answer is exactly ``--max-tokens`` tokens (``ignore_eos``), so modes differ only in
their prompts and adapters. Adapters are pre-built: documents without one in ``--store``
get a synthetic rank-2 adapter there (random, with the spread of trained ones; speed
depends on shape, not values). DA-RAG needs augmentations (``--augmented``); make them
with ``prag eval --dataset FILE --limit N --mode da-rag --offline-only --out DIR``.

    python bench/table4.py --augmented runs/table4/prep/work/hotpotqa/augmented/<model>-rw1-qa3.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from common import run_metadata, synthetic_adapter
from server import pct, server_engine, start_server, wait_preloaded
from table4_report import render

MODES = ["closed-book", "standard", "da-rag", "parametric", "combined"]
CONFIGS = {"no-lora": ({}, ["--enable-lora", "0"]), "stock": ({"PRAG_STOCK_LORA_OPS": "1"}, []),
           "prag": ({"PRAG_STOCK_LORA_OPS": "0"}, [])}
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hotpotqa" / "dev_distractor_sample.json"


def prepare(args, model_path: Path, work: Path) -> tuple[list[str], dict]:
    """Questions, corpus, augmentations and adapter store for the servers; returns questions + counts."""
    import torch
    from transformers import AutoConfig

    from prag_vllm.adapters import AdapterStore
    from prag_vllm.augment import load_augmentations
    from prag_vllm.datasets import load_dataset
    from prag_vllm.retrieve import BM25Retriever

    ds = load_dataset(args.data)
    questions = [q.question for q in ds.questions[:args.questions]]
    if len(questions) < args.questions:
        raise SystemExit(f"{args.data} has only {len(questions)} questions")
    hits = BM25Retriever(ds.documents).retrieve(questions, args.top_k)
    needed = {h.doc.id for hs in hits for h in hs}
    augs = load_augmentations(args.augmented) if args.augmented and Path(args.augmented).is_file() else {}
    missing_aug = sorted(needed - set(augs))
    if missing_aug and "da-rag" in args.modes:
        raise SystemExit(f"{len(missing_aug)} of {len(needed)} retrieved documents have no augmentation in "
                         f"{args.augmented}; make them with `prag eval --dataset {args.data} --limit "
                         f"{args.questions} --mode da-rag --offline-only --out DIR` or leave da-rag out (--modes)")
    store = AdapterStore(args.store)
    cfg, g = AutoConfig.from_pretrained(model_path), torch.Generator().manual_seed(0)
    synthetic = 0
    for doc_id in sorted(needed):
        if store.has(doc_id):
            meta = json.loads((store.path(doc_id) / "prag_meta.json").read_text())
            synthetic += bool(meta.get("synthetic"))
            continue
        # the spread of trained Qwen adapters
        store.save(doc_id, synthetic_adapter(cfg, str(model_path), g, r=2, alpha=32.0, a_std=0.015, b_std=0.0018,
                                             meta={"synthetic": True}))
        synthetic += 1
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "corpus.jsonl", "w") as f:
        f.writelines(json.dumps(d.to_dict()) + "\n" for d in ds.documents)
    with open(work / "augmented.jsonl", "w") as f:
        f.writelines(json.dumps(augs[i].to_dict()) + "\n" for i in sorted(needed & set(augs)))
    return questions, {"questions": len(questions), "documents": len(ds.documents), "retrieved": len(needed),
                       "synthetic_adapters": synthetic, "trained_adapters": len(needed) - synthetic}


async def measure(base: str, questions: list[str], modes: list[str], args, lora: bool,
                  subset: int | None = None) -> dict:
    """Steps 1-3 against one server; ``subset``: also the batch step over the first ``subset`` questions."""
    import openai

    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=3600)

    async def ask(q: str, mode: str, max_tokens: int):
        t0 = time.perf_counter()
        r = await client.chat.completions.create(
            model=f"prag-{mode}", messages=[{"role": "user", "content": q}], temperature=0, max_tokens=max_tokens,
            extra_body={"ignore_eos": True, "top_k": args.top_k})
        return r, time.perf_counter() - t0

    async def batch(qs: list[str], mode: str) -> dict:
        t0 = time.perf_counter()
        rs = await asyncio.gather(*(ask(q, mode, args.max_tokens) for q in qs))
        wall = time.perf_counter() - t0
        tokens = sum(r.usage.completion_tokens for r, _ in rs)
        return {"n": len(rs), "seconds": wall, "q_s": len(rs) / wall, "out_tok_s": tokens / wall,
                "parametric_docs": sum(len(r.model_extra["prag"]["parametric"]) for r, _ in rs)}

    await ask("warm-up", "closed-book", 2)
    out: dict = {"latency": {}, "batch": {}}
    phases = {"cold": "ready_ms", "cold read": "read_ms", "cold merge": "merge_ms", "cold vLLM load": "vllm_load_ms"}
    ready: dict[str, list[float]] = {k: [] for k in [*phases, "cached"]}
    lat: dict[str, list[float]] = {m: [] for m in modes}
    prompt: dict[str, list[int]] = {m: [] for m in modes}
    # 1. one request at a time: every mode of a question before the next question
    # (``interleaved``: drift of a shared machine hits all modes alike), or mode by mode
    order = [(q, m) for q in questions for m in modes] if args.order == "interleaved" else \
        [(q, m) for m in modes for q in questions]
    for q, mode in order:
        r, dt = await ask(q, mode, args.max_tokens)
        lat[mode].append(dt)
        prompt[mode].append(r.usage.prompt_tokens)
        ad = (r.model_extra or {}).get("prag", {}).get("adapter")
        if ad and not ad["cache_hit"]:
            for kind, key in phases.items():
                ready[kind].append(ad[key])
    for mode in modes:
        ls = lat[mode]
        out["latency"][mode] = {"n": len(ls), "mean_s": statistics.mean(ls), "p50_s": pct(ls, 0.5),
                                "p95_s": pct(ls, 0.95), "prompt_tokens": statistics.mean(prompt[mode]), "each_s": ls}
        print(f"  1x {mode}: mean {out['latency'][mode]['mean_s']:.3f} s", flush=True)
    if lora:  # 3. the same document sets again: cached
        for q in questions:
            r, _ = await ask(q, "parametric", 1)
            ad = r.model_extra["prag"]["adapter"]
            if ad and ad["cache_hit"]:
                ready["cached"].append(ad["ready_ms"])
        out["adapter_ready_ms"] = {k: {"n": len(v), "p50": pct(v, 0.5), "p95": pct(v, 0.95), "each": v}
                                   for k, v in ready.items() if v}
    for mode in modes:  # 2. the whole set at once
        out["batch"][mode] = await batch(questions, mode)
        print(f"  batch {mode}: {out['batch'][mode]['q_s']:.2f} q/s", flush=True)
    if subset and subset < len(questions):
        out["batch_subset"] = {mode: await batch(questions[:subset], mode) for mode in modes}
    await client.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(DATA), help="QA file in its native format (HotpotQA / 2Wiki: own corpus)")
    ap.add_argument("--questions", type=int, default=100)
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--augmented", default=None, help="augmentations of the retrieved documents (for da-rag)")
    ap.add_argument("--store", default="runs/table4/store", help="adapter store (missing adapters are synthesized)")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--dtype", default="auto", help="auto: bfloat16 where native, else float32")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-loras", type=int, default=32)
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--configs", default="no-lora,stock,prag")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--stock-questions", type=int, default=25,
                    help="questions asked of the stock-ops server (its per-token op makes every long prompt slow); "
                         "the comparison uses the same first questions of the other servers")
    ap.add_argument("--stock-modes", default=",".join(MODES),
                    help="modes run against the stock-ops server")
    ap.add_argument("--order", choices=["interleaved", "by-mode"], default="interleaved",
                    help="step 1: every mode of a question in turn (default), or all questions mode by mode")
    ap.add_argument("--preload-adapters", type=int, choices=[0, 1], default=1,
                    help="servers read the document adapters before the questions (1, default: step 3's cold "
                         "adapter is a document set never merged before, its documents in memory); 0: cold "
                         "requests also read the documents' files")
    ap.add_argument("--work", default="runs/table4/work")
    ap.add_argument("--out", default="docs/results/table4/table4")
    args = ap.parse_args()
    args.modes = args.modes.split(",")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from prag_vllm.models import resolve_model

    model_path = Path(resolve_model(args.model))
    work = Path(args.work)
    questions, counts = prepare(args, model_path, work)
    result = {"meta": run_metadata(), "model": model_path.name, "dtype": None, "data": str(args.data),
              "max_tokens": args.max_tokens, "max_loras": args.max_loras, "prefix_caching": False, "order": args.order,
              "preload_adapters": bool(args.preload_adapters),
              "stock_questions": min(args.stock_questions, args.questions), **counts, "configs": {}}
    print(json.dumps(counts))
    for name in args.configs.split(","):
        env, flags = CONFIGS[name]
        server_args = argparse.Namespace(model=str(model_path), dtype=args.dtype, max_loras=args.max_loras)
        extra = ["--max-num-seqs", str(args.max_num_seqs), "--max-cpu-loras", str(max(args.max_loras, 2 * args.questions)),
                 "--max-model-len", "4096", "--max-top-k", "8", "--enable-prefix-caching", "0",
                 "--preload-adapters", str(args.preload_adapters), *flags]
        run_dir = work / name
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        shutil.copy(work / "augmented.jsonl", run_dir / "augmented.jsonl")
        print(f"== {name}", flush=True)
        proc, base = start_server(server_args, work / "corpus.jsonl", Path(args.store), run_dir, extra=extra,
                                  env={**os.environ, **env})
        try:
            engine = result["configs"].setdefault(name, {})["engine"] = server_engine(base)
            if result["dtype"] not in (None, engine["dtype"]):
                raise SystemExit(f"server {name} runs {engine['dtype']}, an earlier one {result['dtype']}")
            result["dtype"] = engine["dtype"]
            if args.preload_adapters and name != "no-lora":
                result["configs"].setdefault(name, {})["preload"] = wait_preloaded(base)
            modes = ["closed-book"] if name == "no-lora" else args.stock_modes.split(",") if name == "stock" else args.modes
            qs = questions[:args.stock_questions] if name == "stock" else questions
            result["configs"].setdefault(name, {}).update(asyncio.run(measure(
                base, qs, modes, args, lora=name != "no-lora", subset=args.stock_questions)))
        finally:
            proc.terminate()
            proc.wait(timeout=120)
        save(result, Path(args.out))  # after every server: a partial run keeps what it measured
    print(render(result))
    return 0


def save(result: dict, out: Path) -> None:
    from prag_vllm.fileio import atomic_write_json, atomic_write_text

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out.with_suffix(".json"), result)
    atomic_write_text(out.with_suffix(".md"), render(result) + "\n")


if __name__ == "__main__":
    sys.exit(main())
