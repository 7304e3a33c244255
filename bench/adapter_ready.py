"""Document ids -> merged adapter ready in vLLM, side by side: merged in the server vs in vLLM's worker.

Same questions, corpus and adapter store as ``bench/table4.py`` (its ``prepare``). For each
configuration the real server is started on loopback and asked every question once in
parametric mode, one request at a time, with a 1-token answer (cold: each question's
documents are merged and loaded), then once more (cached). The server reports each
phase per request (``prag.adapter``): reading and validating document adapters
(``read``), merging or writing the manifest (``merge``), vLLM's ``add_lora`` (``load``).

Configurations (``--configs``):

* ``server-merge``: ``--worker-merge 0``: the server concatenates and writes the merged
  tensors, vLLM's worker reads and parses them;
* ``worker-merge``: ``--worker-merge 1`` (the default): the server writes a manifest, the
  worker merges from document adapters it keeps in memory;
* ``worker-merge+preload``: the same with ``--preload-adapters 1`` (the server reads and
  validates every document adapter at start, so requests read no file on its side).

    python bench/adapter_ready.py --questions 100 --max-loras 100 --out docs/results/adapter_ready/adapter_ready
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from common import run_metadata
from server import pct, start_server, wait_preloaded
from table4 import DATA, prepare

CONFIGS = {"server-merge": ["--worker-merge", "0"], "worker-merge": ["--worker-merge", "1"],
           "worker-merge+preload": ["--worker-merge", "1", "--preload-adapters", "1"]}
PHASES = {"ready": "ready_ms", "read": "read_ms", "merge": "merge_ms", "load": "vllm_load_ms"}


async def measure(base: str, questions: list[str], top_k: int, preload: bool) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=600)

    async def ask(q: str):
        r = await client.chat.completions.create(model="prag-parametric", messages=[{"role": "user", "content": q}],
                                                 temperature=0, max_tokens=1, extra_body={"top_k": top_k})
        return r.model_extra["prag"]["adapter"]

    await client.chat.completions.create(model="prag-closed-book", messages=[{"role": "user", "content": "hi"}],
                                         max_tokens=2)
    if preload:  # wait until the server's background preload is done
        await asyncio.to_thread(wait_preloaded, base)
    cold: dict[str, list[float]] = {k: [] for k in PHASES}
    cached: list[float] = []
    t0 = time.perf_counter()
    for q in questions:
        ad = await ask(q)
        if ad and not ad["cache_hit"]:
            for k, key in PHASES.items():
                cold[k].append(ad[key])
    wall = time.perf_counter() - t0
    for q in questions:
        ad = await ask(q)
        if ad and ad["cache_hit"]:
            cached.append(ad["ready_ms"])
    await client.close()
    n = len(cold["ready"])
    quarters = [statistics.median(cold["ready"][i * n // 4:(i + 1) * n // 4]) for i in range(4)] if n >= 4 else []
    return {"cold": {k: {"n": len(v), "p50": pct(v, 0.5), "p95": pct(v, 0.95), "each": v} for k, v in cold.items()},
            "cold_ready_p50_by_quarter": quarters,
            "cached": {"n": len(cached), "p50": pct(cached, 0.5), "p95": pct(cached, 0.95)},
            "cold_pass_seconds": wall}


def render(result: dict) -> str:
    m = result["meta"]
    lines = ["# Adapter ready: merged in the server vs in vLLM's worker", "",
             f"`python {m['command']}`  ", f"{m['date']}, {m['machine']}, commit {result['commit']}; "
             f"{result['model']} {result['dtype']}, {result['questions']} questions, top-{result['top_k']}, "
             f"max_loras {result['max_loras']}, one request at a time, 1-token answers"
             f"{'; server environment ' + ' '.join(result['server_env']) if result.get('server_env') else ''}.", "",
             "| config | cold ready p50 | p95 | read p50 | merge p50 | vLLM load p50 | cold p50 by quarter | "
             "cached p50 |", "|---|---:|---:|---:|---:|---:|---|---:|"]
    for name, r in result["configs"].items():
        c = r["cold"]
        lines.append(f"| {name} | {c['ready']['p50']:.1f} | {c['ready']['p95']:.1f} | {c['read']['p50']:.1f} | "
                     f"{c['merge']['p50']:.1f} | {c['load']['p50']:.1f} | "
                     f"{' / '.join(f'{x:.0f}' for x in r['cold_ready_p50_by_quarter'])} | {r['cached']['p50']:.2f} |")
    lines += ["", "All times in ms. `read`: reading and validating document adapters not in the server's "
              "memory; `merge`: concatenating and writing the merged tensors (server-merge) or writing the "
              "manifest (worker-merge); `vLLM load`: `add_lora` round trip (with worker-merge it includes the "
              "worker's merge)."]
    return "\n".join(lines)


def _commit() -> str:
    import subprocess

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], capture_output=True, text=True).stdout.strip()

    return (git("rev-parse", "--short", "HEAD") or "?") + (" (uncommitted changes)" if git("status", "--porcelain",
                                                                                           "--untracked-files=no") else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--questions", type=int, default=100)
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--store", default="runs/table4/store", help="adapter store (missing adapters are synthesized)")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-loras", type=int, default=100)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment variable for every server started (repeatable)")
    ap.add_argument("--work", default="runs/adapter_ready")
    ap.add_argument("--out", default="docs/results/adapter_ready/adapter_ready")
    args = ap.parse_args()
    args.augmented, args.modes = None, ["parametric"]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from prag_vllm.fileio import atomic_write_json, atomic_write_text
    from prag_vllm.models import resolve_model

    env = dict(os.environ)
    for item in args.server_env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--server-env wants KEY=VALUE, got {item!r}")
        env[key] = value
    unknown = sorted(set(args.configs.split(",")) - set(CONFIGS))
    if unknown:
        raise SystemExit(f"unknown config(s) {unknown}; choose from {', '.join(CONFIGS)}")
    model_path = Path(resolve_model(args.model))
    work = Path(args.work)
    questions, counts = prepare(args, model_path, work)
    result = {"meta": run_metadata(), "commit": _commit(), "server_env": args.server_env, "model": model_path.name,
              "dtype": args.dtype, "top_k": args.top_k, "max_loras": args.max_loras, **counts, "configs": {}}
    out = Path(args.out)
    for name in args.configs.split(","):
        run_dir = work / name
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        print(f"== {name}", flush=True)
        server_args = argparse.Namespace(model=str(model_path), dtype=args.dtype, max_loras=args.max_loras)
        extra = ["--max-cpu-loras", str(max(args.max_loras, 2 * args.questions)), "--max-top-k", "8",
                 "--enable-prefix-caching", "0", *CONFIGS[name]]
        proc, base = start_server(server_args, work / "corpus.jsonl", Path(args.store), run_dir, extra=extra,
                                  env=env)
        try:
            result["configs"][name] = asyncio.run(measure(base, questions, args.top_k, "preload" in name))
        finally:
            proc.terminate()
            proc.wait(timeout=120)
        r = result["configs"][name]
        print(f"  cold ready p50 {r['cold']['ready']['p50']:.1f} ms, cached {r['cached']['p50']:.2f} ms", flush=True)
        atomic_write_json(out.with_suffix(".json"), result)  # after every server: a partial run keeps what it has
        atomic_write_text(out.with_suffix(".md"), render(result) + "\n")
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
