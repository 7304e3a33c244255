"""LoRA work of one model step, op level: the plugin's planned path on one model's FFN shapes.

Runs :func:`prag_vllm.vllm_plugin.punica.apply_plan` over every FFN LoRA layer of a model
(gate/up as one 2-slice layer, down as one) with vLLM-shaped slot buffers (bf16,
``--max-rank`` wide, ``--requests`` + 1 slots), no engine, and reports ms per step:

* ``decode 1 request``: one token, one adapter (the ``runs`` plan, float32 compute), with
  the float32 slot copies cached and resolved once per plan (as served), looked up at every
  call (as before the per-plan programs), and converted again every step (as before the
  cache);
* ``decode N requests``: N tokens, N distinct adapters (the ``gather`` plan);
* ``prefill``: one prompt of ``--prompt`` tokens with one adapter (``runs``, bf16).

    python bench/lora_step.py [--model qwen2.5-coder-0.5b-instruct] [--out runs/bench/lora_step]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from common import run_metadata


def layers(cfg, slots: int, rank: int, gen, dt):
    import torch

    h, i = cfg.hidden_size, cfg.intermediate_size

    def stack(rows, cols):
        return torch.randn(slots, 1, rows, cols, generator=gen).mul_(0.01).to(dt)

    out = []
    for _ in range(cfg.num_hidden_layers):
        gate_up = ((stack(rank, h), stack(rank, h)), (stack(i, rank), stack(i, rank)), (i, i))
        down = ((stack(rank, i),), (stack(h, rank),), (h,))
        out.append((gate_up, down))
    return out


def time_step(stack, plan, n_tokens: int, cfg, reps: int, clear_cache: bool, programs: bool = True) -> float:
    import torch

    from prag_vllm.vllm_plugin import punica

    dt = stack[0][0][0][0].dtype
    x1, x2 = torch.randn(n_tokens, cfg.hidden_size).to(dt), torch.randn(n_tokens, cfg.intermediate_size).to(dt)
    y1 = torch.zeros(n_tokens, 2 * cfg.intermediate_size, dtype=dt)
    y2 = torch.zeros(n_tokens, cfg.hidden_size, dtype=dt)

    apply = punica.apply if programs and not clear_cache else punica.apply_plan

    def step():
        if clear_cache:
            punica._F32.clear()
        for (ga, gb, gs), (da, db, ds) in stack:
            apply(plan, y1, x1, ga, gb, 1.0, gs)
            apply(plan, y2, x2, da, db, 1.0, ds)

    for _ in range(3):
        step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--max-rank", type=int, default=8, help="vLLM's slot rank (a top-3 merge, rank 6, sits in 8)")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                    help="the model's dtype: the slots' and activations' (engine dtype auto is float32 on a CPU "
                         "without native bf16)")
    ap.add_argument("--out", default="runs/bench/lora_step")
    args = ap.parse_args()
    import torch
    from transformers import AutoConfig

    from prag_vllm.models import resolve_model
    from prag_vllm.vllm_plugin import punica

    cfg = AutoConfig.from_pretrained(resolve_model(args.model))
    slots = args.requests + 1
    stack = layers(cfg, slots, args.max_rank, torch.Generator().manual_seed(0), getattr(torch, args.dtype))
    cases = [
        ("decode 1 request, float32 slot copies cached", punica.make_plan(torch.tensor([3])), 1, False),
        ("decode 1 request, cached copies looked up at every call (no per-plan program)",
         punica.make_plan(torch.tensor([3])), 1, False, False),
        ("decode 1 request, converted every step", punica.make_plan(torch.tensor([3])), 1, True),
        (f"decode {args.requests} requests, distinct adapters", punica.make_plan(torch.arange(args.requests)),
         args.requests, False),
        (f"prefill {args.prompt} tokens, one adapter", punica.make_plan(torch.full((args.prompt,), 3)), args.prompt,
         False),
    ]
    rows = [(name, plan.kind, time_step(stack, plan, n, cfg, args.reps, *flags)) for name, plan, n, *flags in cases]
    result = {"meta": run_metadata(), "model": args.model, "layers": cfg.num_hidden_layers, "max_rank": args.max_rank,
              "dtype": args.dtype,
              "slots": slots, "rows": [{"case": n, "plan": k, "ms_per_step": ms} for n, k, ms in rows]}
    meta = result["meta"]
    table = "\n".join([f"# LoRA work per model step, op level — {args.model} {args.dtype}, {meta['machine']}, "
                       f"{meta['date']}", "", f"`{result['meta']['command']}`", "",
                       "| case | plan | ms per step (median) |", "|---|---|---:|"]
                      + [f"| {n} | {k} | {ms:.2f} |" for n, k, ms in rows])
    print(table)
    from prag_vllm.fileio import atomic_write_json, atomic_write_text

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out.with_suffix(".json"), result)
    atomic_write_text(out.with_suffix(".md"), table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
