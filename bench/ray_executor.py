"""Parameterization documents/hour: the local executor vs Ray with 1 and 2 trainer actors, one run.

The same documents are trained three times, each into its own fresh store: in this process
(``--executor local``), then on a local Ray cluster with 1 and with 2 trainer actors
(``--executor ray``, one torch thread per actor CPU). Reported: wall seconds, documents/hour,
the speed-up over local, and whether every adapter equals the local one bit for bit (float32
only; bf16-mixed runs report the largest difference). Ray's cluster start and the actors'
model loads are inside the timed Ray runs (they are what a user waits for); the local run
times its trainer's model load too.

On a 2-core machine two actors share the cores that one local trainer already uses, so no
speed-up is expected here: the figure measures Ray's overhead, not its scaling.

    python bench/ray_executor.py --model smollm2-135m-instruct --docs 12 \\
        --out docs/results/ray_executor/ray_executor.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import run_metadata


def documents(n: int):
    """``n`` invented documents (the demo corpus, repeated with other ids if need be)."""
    from prag_vllm.corpus import Document
    from prag_vllm.demo_data import DOCUMENTS

    out = []
    for i in range(n):
        d = DOCUMENTS[i % len(DOCUMENTS)]
        out.append(Document(f"{d['id']}-{i}", d["title"], d["text"]))
    return out


def max_difference(a_store, b_store, docs) -> float:
    worst = 0.0
    for d in docs:
        a, b = a_store.load(d.id), b_store.load(d.id)
        for m in a.weights:
            for i in (0, 1):
                worst = max(worst, (a.weights[m][i].float() - b.weights[m][i].float()).abs().max().item())
    return worst


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--docs", type=int, default=12)
    p.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    p.add_argument("--precision", choices=["float32", "bf16-mixed"], default="float32")
    p.add_argument("--chunk-documents", type=int, default=4)
    p.add_argument("--out", default=None, help="JSON results (and a .md table beside it)")
    args = p.parse_args()

    from prag_vllm.adapters import AdapterStore
    from prag_vllm.executors import ExecutorConfig, get_executor
    from prag_vllm.models import resolve_model
    from prag_vllm.parameterize import TrainConfig
    from prag_vllm.training import BatchConfig

    model = resolve_model(args.model)
    docs = documents(args.docs)
    cfg = TrainConfig(precision=args.precision, **({"epochs": args.epochs} if args.epochs else {}))
    batch = BatchConfig()
    root = Path(tempfile.mkdtemp(prefix="prag-bench-ray-"))
    rows, stores = [], {}
    try:
        runs = [("local", ExecutorConfig()), *(
            (f"ray, {n} actor{'s' if n > 1 else ''}",
             ExecutorConfig(kind="ray", actors=n, cpus_per_actor=max(1, (os.cpu_count() or 1) // n),
                            chunk_documents=args.chunk_documents)) for n in (1, 2))]
        for name, ex_cfg in runs:
            store = stores[name] = AdapterStore(root / name.replace(" ", "").replace(",", "-"))
            t0 = time.perf_counter()
            with get_executor(ex_cfg) as ex:
                summary = ex.parameterize(docs, {}, store, model, cfg, batch)
            seconds = time.perf_counter() - t0
            rows.append({"executor": name, "documents": summary["trained"], "seconds": round(seconds, 1),
                         "documents_per_hour": round(summary["trained"] / seconds * 3600, 1)})
            print(f"{name}: {summary['trained']} documents in {seconds:.1f} s", file=sys.stderr)
        local = rows[0]
        for row, (name, _) in zip(rows, runs):
            row["vs_local"] = round(row["documents_per_hour"] / local["documents_per_hour"], 2)
            row["max_abs_difference_vs_local"] = max_difference(stores["local"], stores[name], docs)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    lines = ["| executor | documents | seconds | documents/hour | vs local | max |Δ| vs local |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['executor']} | {r['documents']} | {r['seconds']} | {r['documents_per_hour']} | {r['vs_local']}x "
              f"| {r['max_abs_difference_vs_local']:.3g} |" for r in rows]
    meta = run_metadata()
    table = "\n".join(lines)
    print(table)
    print(f"\n{meta['machine']}; {args.model}, {args.docs} documents, {args.precision}, {meta['date']}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**meta, "model": args.model, "precision": args.precision, "rows": rows}, indent=1))
        out.with_suffix(".md").write_text(f"{table}\n\n{meta['machine']}; {args.model}, {args.docs} documents, "
                                          f"{args.precision}, {meta['date']}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
