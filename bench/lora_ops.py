"""Side-by-side: vLLM's stock CPU LoRA ops vs this project's grouped ops (issue 8 groundwork).

Each configuration runs in its own process (the ops are chosen when the engine starts):
no LoRA, stock ops + LoRA, grouped ops + LoRA. Same prompts, same adapters (``--adapters``:
PEFT dirs, cycled over the requests), greedy, one ``LLM.chat`` batch, timed after a warm-up.

    python bench/lora_ops.py --adapters runs/demo/adapters/<model>/docs/* --requests 32 --max-tokens 32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from common import run_metadata

CONFIGS = [("no-lora", "0", False), ("stock-ops+lora", "1", True), ("grouped-ops+lora", "0", True)]


def child(args) -> None:
    from prag_vllm.generate import EngineConfig, VLLMEngine
    from prag_vllm.models import resolve_model

    questions = [f"In one sentence, what is {t}?" for t in
                 ("a glassblower", "a stone arch bridge", "a lantern festival", "a cellist", "a mountain", "a library",
                  "a river", "a workshop")]
    convs = [[{"role": "user", "content": questions[i % len(questions)]}] for i in range(args.requests)]
    adapters = [args.adapters[i % len(args.adapters)] for i in range(args.requests)] if args.lora else None
    with VLLMEngine(EngineConfig(model=str(resolve_model(args.model)), dtype="bfloat16", max_model_len=1024,
                                 max_loras=max(1, len(args.adapters)), max_num_seqs=args.requests,
                                 null_adapter_guard=False)) as engine:
        engine.generate(convs[:2], adapters[:2] if adapters else None, max_tokens=4)  # warm-up
        t0 = time.perf_counter()
        gens = engine.generate(convs, adapters, max_tokens=args.max_tokens)
        wall = time.perf_counter() - t0
    tokens = sum(len(g.token_ids) for g in gens)
    print("RESULT " + json.dumps({"seconds": wall, "output_tokens": tokens, "tok_s": tokens / wall}), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapters", nargs="+", required=True)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", default="runs/bench/lora_ops.json")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--lora", action="store_true")
    args = ap.parse_args()
    if args.child:
        child(args)
        return 0
    rows = []
    for name, stock, lora in CONFIGS:
        cmd = [sys.executable, __file__, "--child", "--model", args.model, "--requests", str(args.requests),
               "--max-tokens", str(args.max_tokens), "--adapters", *args.adapters] + (["--lora"] if lora else [])
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PRAG_STOCK_LORA_OPS": stock})
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        rows.append({"config": name, **json.loads(line[7:])})
    base = rows[0]["tok_s"]
    print(f"\n{args.requests} requests x {args.max_tokens} tokens, {len(args.adapters)} distinct adapters, {args.model}, bf16")
    print("| config | seconds | output tok/s | vs no-LoRA |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['config']} | {r['seconds']:.1f} | {r['tok_s']:.1f} | {r['tok_s'] / base:.2f}x |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    from prag_vllm.fileio import atomic_write_json
    atomic_write_json(args.out, {**run_metadata(), "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
