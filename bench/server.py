"""Server benchmark: adapter readiness (cold / cached) and per-request latency per mode, one run.

Starts the real server (``python -m serving``) on loopback with the default model and a
bench workspace: the demo corpus with its trained adapters (``make demo`` makes them)
plus ``--fillers`` invented documents with random rank-2 adapters, so that many distinct
document sets can be merged cold. Then, through the official ``openai`` client:

1. document ids -> adapter ready (merge + write + load into vLLM), as the server measures
   it (``prag.adapter.ready_ms``): ``--sets`` distinct 3-document sets cold, then the same
   sets again (cached);
2. per-request latency, one request at a time, for every mode on the demo questions.

    python bench/server.py [--model qwen2.5-coder-0.5b-instruct] [--out docs/results/server_bench/server_bench]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import run_metadata, synthetic_adapter

MODES = ["closed-book", "standard", "da-rag", "parametric", "combined"]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def build_workspace(root: Path, demo: Path, model_path: Path, fillers: int) -> tuple[Path, Path, list[str]]:
    import torch
    from transformers import AutoConfig

    from prag_vllm.adapters import AdapterStore
    from prag_vllm.corpus import load_corpus
    from prag_vllm.workspace import Workspace

    demo_ws = Workspace.at(demo)
    demo_store = demo_ws.store(model_path)
    docs = load_corpus(demo_ws.root / "corpus.jsonl")
    if not all(demo_store.has(d.id) for d in docs):
        raise SystemExit(f"no trained demo adapters in {demo_store.root}: run `make demo` first")
    store = AdapterStore(root / "store")
    for d in docs:
        shutil.copytree(demo_store.path(d.id), store.path(d.id))
    rows = [d.to_dict() for d in docs]
    names = [f"Zorvex{i:03d}" for i in range(fillers)]
    cfg = AutoConfig.from_pretrained(model_path)
    g = torch.Generator().manual_seed(0)
    for i, name in enumerate(names):
        rows.append({"id": f"filler-{i}", "title": name, "text": f"{name} is an invented bench entity number {i}."})
        store.save(f"filler-{i}", synthetic_adapter(cfg, str(model_path), g, r=2, alpha=32.0, a_std=0.01, b_std=0.001))
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.copy(demo_ws.augmented, root / "augmented.jsonl")
    return corpus, store.root, names


def start_server(args, corpus: Path, store: Path, work: Path, extra: list[str] = (),
                 env: dict | None = None) -> tuple[subprocess.Popen, str]:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "serving", "--corpus", str(corpus), "--work-dir", str(work), "--adapter-store",
           str(store), "--model", args.model, "--dtype", args.dtype, "--port", str(port), "--log-level", "warning",
           "--max-loras", str(args.max_loras), *extra]
    proc = subprocess.Popen(cmd, stdout=open(work / "server.log", "w"), stderr=subprocess.STDOUT, env=env)
    base, t0 = f"http://127.0.0.1:{port}", time.time()
    while time.time() - t0 < 600:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: see {work / 'server.log'}")
        try:
            health = httpx.get(base + "/health", timeout=2)
            if health.status_code == 200:
                print(f"server up in {time.time() - t0:.0f} s: {health.json()['engine']}")
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise SystemExit("server did not start")


def server_engine(base: str) -> dict:
    """What the server says it runs (``GET /health``): ``dtype`` (resolved) and ``lora_ops``."""
    import httpx

    return httpx.get(base + "/health", timeout=10).json()["engine"]


def wait_preloaded(base: str, timeout: float = 900) -> dict:
    """Wait until the server's ``--preload-adapters`` is done (``GET /health``); returns its progress."""
    import httpx

    t0 = time.time()
    while time.time() - t0 < timeout:
        state = httpx.get(base + "/health", timeout=10).json().get("preload") or {}
        if not state.get("running"):
            print(f"preload: {state}", flush=True)
            return state
        time.sleep(1)
    raise SystemExit(f"preload not done after {timeout:.0f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--dtype", default="auto", help="auto: bfloat16 where native, else float32")
    p.add_argument("--demo", default="runs/demo", help="demo workspace with trained adapters")
    p.add_argument("--fillers", type=int, default=120, help="invented documents (>= 3 x --sets)")
    p.add_argument("--sets", type=int, default=40, help="distinct 3-document sets merged cold")
    p.add_argument("--max-loras", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--out", default="docs/results/server_bench/server_bench")
    args = p.parse_args()
    if args.fillers < 3 * args.sets:
        p.error("--fillers must be at least 3 x --sets (every cold set is new)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import openai

    from prag_vllm.demo_data import QUESTIONS
    from prag_vllm.models import resolve_model

    model_path = Path(resolve_model(args.model))
    args.model = str(model_path)
    work = Path(tempfile.mkdtemp(prefix="prag-bench-server-"))
    corpus, store, names = build_workspace(work, Path(args.demo), model_path, args.fillers)
    proc, base = start_server(args, corpus, store, work)
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=300)
    result = {"meta": run_metadata(), "model": model_path.name, **server_engine(base)}
    try:
        def ask(q: str, mode: str, max_tokens: int):
            t0 = time.perf_counter()
            r = client.chat.completions.create(model=f"prag-{mode}", messages=[{"role": "user", "content": q}],
                                               temperature=0, max_tokens=max_tokens)
            return r, time.perf_counter() - t0

        ask("warm-up", "closed-book", 2)
        sets = [(names[(3 * i) % len(names)], names[(3 * i + 1) % len(names)], names[(3 * i + 2) % len(names)])
                for i in range(args.sets)]
        ready = {"cold": [], "cached": []}
        parts = {"merge_ms": [], "vllm_load_ms": []}
        for phase in ("cold", "cached"):
            for s in sets:
                r, _ = ask(f"What do {s[0]}, {s[1]} and {s[2]} have in common?", "parametric", 1)
                ad = r.model_extra["prag"]["adapter"]
                assert ad and ad["cache_hit"] == (phase == "cached"), ad
                ready[phase].append(ad["ready_ms"])
                if phase == "cold":
                    for k in parts:
                        parts[k].append(ad[k])
        ready.update({f"cold: {k}": v for k, v in parts.items()})
        result["adapter_ready_ms"] = {ph: {"n": len(v), "p50": pct(v, 0.5), "p95": pct(v, 0.95), "mean": statistics.mean(v)}
                                      for ph, v in ready.items()}
        per_mode = {}
        for mode in MODES:
            lat, toks = [], []
            for q in QUESTIONS:
                r, dt = ask(q["question"], mode, args.max_tokens)
                lat.append(dt)
                toks.append(r.usage.prompt_tokens)
            per_mode[mode] = {"n": len(lat), "mean_s": statistics.mean(lat), "p50_s": pct(lat, 0.5),
                              "p95_s": pct(lat, 0.95), "prompt_tokens": statistics.mean(toks)}
        std = per_mode["standard"]["mean_s"]
        for m in per_mode.values():
            m["speedup_vs_standard"] = std / m["mean_s"]
        result["latency"] = per_mode
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    lines = [f"Server bench — {result['model']} {result['dtype']}, {result['meta']['machine']}, {result['meta']['date']}",
             f"`{result['meta']['command']}`", "",
             "| adapter ready (ids -> loaded in vLLM) | n | p50 ms | p95 ms | mean ms |", "|---|---:|---:|---:|---:|"]
    for ph, v in result["adapter_ready_ms"].items():
        lines.append(f"| {ph} (3 documents, rank 6) | {v['n']} | {v['p50']:.2f} | {v['p95']:.2f} | {v['mean']:.2f} |")
    lines += ["", f"| mode (one request at a time, {args.max_tokens} max tokens) | n | mean s | p50 s | p95 s | "
                  "prompt tokens | speed-up vs standard |", "|---|---:|---:|---:|---:|---:|---:|"]
    for mode, v in result["latency"].items():
        lines.append(f"| {mode} | {v['n']} | {v['mean_s']:.3f} | {v['p50_s']:.3f} | {v['p95_s']:.3f} | "
                     f"{v['prompt_tokens']:.0f} | {v['speedup_vs_standard']:.2f}x |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(table + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
