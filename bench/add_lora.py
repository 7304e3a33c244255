"""Where a cold merged adapter's ``add_lora`` goes, timed inside vLLM's worker.

An offline engine (the default model, engine dtype ``auto``) is given ``--documents``
random rank-2 document adapters (read into the worker's document cache first, as the
server's ``--preload-adapters 1`` does), then ``--adapters`` merge manifests of
``--top-k`` of them, one at a time: ``add_lora``, then a 1-token answer with that adapter
(so each adapter is activated in a live engine, as in serving). Timers wrapped around
vLLM's worker methods (installed through ``collective_rpc``) split each ``add_lora``:

* ``build``: ``_load_adapter`` (read the manifest, build the ``LoRAModel``);
* ``register``: ``LoRAModelManager.add_adapter`` (packing gate/up, eviction);
* ``activate``: ``activate_adapter`` (writing the adapter into a LoRA slot);
* ``worker``: the worker's whole ``add_lora``; ``round trip``: ``LLM``'s ``add_lora`` call.

    python bench/add_lora.py --adapters 60 --out docs/results/add_lora/add_lora

Prints a table and writes ``OUT.json`` / ``OUT.md``. Needs
``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` (set here) for the timers' RPC.
"""

from __future__ import annotations

import argparse
import atexit
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import run_metadata, synthetic_adapter
from server import pct

PHASES = ("round trip", "worker", "build", "register", "activate")


def install_timers(worker, profile: bool = False) -> bool:
    """Worker RPC: wrap the phases' methods with timers (idempotent); ``profile``: also run
    cProfile over every ``add_lora``."""
    import cProfile
    import time as _time

    from vllm.lora import model_manager, worker_manager

    if getattr(worker, "_prag_timers", None) is not None:
        return True
    times: dict[str, list[float]] = {"worker": [], "build": [], "register": [], "activate": []}
    worker._prag_timers = times
    worker._prag_profile = cProfile.Profile() if profile else None

    def timed(owner, name, key):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            prof = worker._prag_profile if key == "worker" else None
            if prof is not None:
                prof.enable()
            t0 = _time.perf_counter()
            result = None
            try:
                result = original(*args, **kwargs)
                return result
            finally:
                if key != "activate" or result:  # activate_adapter is False for an adapter already in a slot
                    times[key].append(_time.perf_counter() - t0)
                if prof is not None:
                    prof.disable()

        setattr(owner, name, wrapper)

    timed(worker_manager.LRUCacheWorkerLoRAManager, "_load_adapter", "build")
    timed(model_manager.LRUCacheLoRAModelManager, "add_adapter", "register")
    timed(model_manager.LRUCacheLoRAModelManager, "activate_adapter", "activate")
    timed(worker, "add_lora", "worker")
    return True


def take_times(worker) -> dict:
    """Worker RPC: the recorded times (ms), emptied."""
    out = {k: [t * 1000 for t in v] for k, v in worker._prag_timers.items()}
    for v in worker._prag_timers.values():
        v.clear()
    return out


def profile_report(worker, lines: int = 40) -> str:
    """Worker RPC: cProfile's top functions by cumulative time over the profiled ``add_lora`` calls."""
    import io
    import pstats

    if worker._prag_profile is None:
        return ""
    out = io.StringIO()
    stats = pstats.Stats(worker._prag_profile, stream=out)
    stats.sort_stats("cumulative").print_stats(lines)
    stats.sort_stats("tottime").print_stats(lines // 2)
    return out.getvalue()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--lora-dtype", default="auto", help="vLLM's lora_dtype (auto: the engine's)")
    ap.add_argument("--documents", type=int, default=40)
    ap.add_argument("--adapters", type=int, default=60, help="merged adapters loaded, one at a time")
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--max-loras", type=int, default=32)
    ap.add_argument("--warm-up", type=int, default=5, help="first adapters left out of the figures")
    ap.add_argument("--profile", action="store_true", help="cProfile the worker's add_lora (slower; to OUT.prof.txt)")
    ap.add_argument("--out", default="docs/results/add_lora/add_lora")
    args = ap.parse_args()
    if args.adapters <= args.warm_up or args.documents < args.top_k:
        raise SystemExit("--adapters must exceed --warm-up, and --documents be at least --top-k")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    import torch
    from transformers import AutoConfig
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    from prag_vllm.adapters import LoraAdapter
    from prag_vllm.fileio import atomic_write_json, atomic_write_text
    from prag_vllm.generate import EngineConfig, VLLMEngine, resolve_dtype
    from prag_vllm.merge import write_merge_manifest
    from prag_vllm.models import resolve_model
    from prag_vllm.vllm_plugin.merged import part_record

    model = str(resolve_model(args.model))
    cfg = AutoConfig.from_pretrained(model)
    tmp = Path(tempfile.mkdtemp(prefix="prag-add-lora-"))
    atexit.register(shutil.rmtree, tmp, True)  # the synthetic documents and manifests go with the run
    g = torch.Generator().manual_seed(0)
    docs = []
    for i in range(args.documents):
        ad = synthetic_adapter(cfg, model, g, r=2, alpha=32.0, a_std=0.015, b_std=0.0018)
        docs.append(LoraAdapter.load(ad.save(tmp / "docs" / f"d{i}")))
    engine = VLLMEngine(EngineConfig(model=model, dtype=args.dtype, max_loras=args.max_loras,
                                     extra={"max_cpu_loras": max(args.max_loras, args.adapters + 1),
                                            "lora_dtype": args.lora_dtype}))
    llm = engine.llm
    llm.collective_rpc("prag_preload_parts", args=([part_record(d) for d in docs],))
    llm.collective_rpc(install_timers, args=(args.profile,))
    rng = random.Random(0)
    sampling = SamplingParams(max_tokens=1, temperature=0)
    trips = []
    for n in range(args.adapters):
        ids = rng.sample(range(args.documents), args.top_k)
        path = tmp / "merged" / f"m{n}"
        write_merge_manifest([docs[i] for i in ids], path, [f"d{i}" for i in ids])
        request = LoRARequest(lora_name=f"m{n}", lora_int_id=n + 1, lora_path=str(path))
        t0 = time.perf_counter()
        llm.llm_engine.add_lora(request)
        trips.append((time.perf_counter() - t0) * 1000)
        llm.generate(["Who"], sampling, lora_request=request, use_tqdm=False)
    times = llm.collective_rpc(take_times)[0]
    report = llm.collective_rpc(profile_report)[0] if args.profile else ""
    times["round trip"] = trips
    skip = args.warm_up
    rows = {k: {"n": len(times[k][skip:]), "p50": pct(times[k][skip:], 0.5), "p95": pct(times[k][skip:], 0.95),
                "mean": statistics.fmean(times[k][skip:])} for k in PHASES}
    result = {"meta": run_metadata(), "model": Path(model).name, "dtype": str(resolve_dtype(args.dtype)),
              "documents": args.documents, "adapters": args.adapters, "top_k": args.top_k,
              "max_loras": args.max_loras, "warm_up": skip, "phases": rows, "each": times}
    m = result["meta"]
    lines = ["# add_lora of a merged adapter, inside vLLM's worker", "",
             f"`python {m['command']}`  ", f"{m['date']}, {m['machine']}; {result['model']} {result['dtype']}, "
             f"{args.documents} random rank-2 documents preloaded in the worker, {args.adapters} merge manifests of "
             f"top-{args.top_k} (first {skip} left out), max_loras {args.max_loras}, a 1-token answer after each.", "",
             "| phase | n | p50 ms | p95 ms | mean ms |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {k} | {r['n']} | {r['p50']:.2f} | {r['p95']:.2f} | {r['mean']:.2f} |" for k, r in rows.items()]
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    if report:
        atomic_write_text(out.with_suffix(".prof.txt"), report)
        print(report)
    atomic_write_json(out.with_suffix(".json"), result)
    atomic_write_text(out.with_suffix(".md"), text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
