"""Training recipes compared: does a document's knowledge get into its adapter, cleanly?

One vLLM engine (default model) for everything; work dirs under
``$PRAG_CACHE_DIR/bench/recipes`` (resumable: rerun the same command to continue).

1. **fictional**: ``prag bench-data fictional`` (invented entities: closed-book cannot
   know them). Every document is augmented and trained under each recipe; all five modes
   at top-3 (``prag eval`` machinery); then *merge interference*: parametric F1 with the
   gold documents forced into a merge of k = 1, 2, 3, 5 adapters (the rest BM25's next hits).
2. **2wiki**: the shared 2WikiMultihopQA sample, ``--per-type 5``, top-3, five modes.

Writes ``OUT.json`` (keys ``fictional`` and ``2wiki``: per recipe and mode ``f1``, ``em``,
``template_leaks``, ``hit_max_tokens``, ``questions``; per recipe ``train_s_per_doc``)
and ``OUT.md``, and each run's ``prag eval`` report under ``OUT/``.

    python bench/recipes.py --jobs fictional@default,2wiki@default,fictional@paper --out docs/results/recipes
    python bench/recipes.py --merge run1.json run2.partial.json --out docs/results/recipes   # one table
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

from prag_vllm.audit import AnswerAudit
from prag_vllm.fileio import JsonlAppender, atomic_write_json, atomic_write_text, read_jsonl
from prag_vllm.metrics import best_scores, extract_answer

logger = logging.getLogger("bench.recipes")
MODES = ["closed-book", "standard", "da-rag", "parametric", "combined"]


def machine() -> dict:
    flags = subprocess.run(["bash", "-c", "lscpu | grep -i 'model name\\|^flags'"], capture_output=True, text=True).stdout
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f} " in flags + " "]
    name = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if "odel name" in line), platform.processor())
    return {"cpu": name, "isa": isa, "cores": __import__("os").cpu_count()}


def mode_table(metrics: dict) -> dict:
    """``{mode: {f1, em, template_leaks, hit_max_tokens, questions}}`` of a one-dataset ``prag eval`` run."""
    (ds,) = metrics["datasets"].values()
    return {e["mode"]: {"f1": e["f1"]["total"], "em": e["em"]["total"], "template_leaks": e.get("template_leaks", 0),
                        "hit_max_tokens": e.get("hit_max_tokens", 0), "questions": e["n"]["total"]}
            for e in ds["rows"]}


def train_all(docs, augs, store, model_path, tcfg, timing_file: Path) -> float | None:
    """Train every document (resumable); seconds per document of the runs that trained."""
    from prag_vllm.training.driver import parameterize_batched

    timing = json.loads(timing_file.read_text()) if timing_file.is_file() else {"docs": 0, "seconds": 0.0}
    summary = parameterize_batched(docs, augs, store, model_path, tcfg)
    if summary["trained"]:
        timing = {"docs": timing["docs"] + summary["trained"], "seconds": timing["seconds"] + summary["seconds"]}
        atomic_write_json(timing_file, timing)
    return round(timing["seconds"] / timing["docs"], 2) if timing["docs"] else None


def interference(engine, questions, docs, retriever, store, ks: list[int], out: Path, max_tokens: int,
                 policy: str = "sum") -> dict:
    """Parametric F1 per k with the gold documents forced into the merge (bare question)."""
    from prag_vllm.merge import MergedAdapterCache
    from prag_vllm.modes import get_mode

    merged = MergedAdapterCache(store, policy=policy)
    audit = AnswerAudit.for_tokenizer(engine.tokenizer)
    path = out / "interference.jsonl"
    done = {(r["id"], r["k"]) for r in read_jsonl(path, tolerate_torn_tail=True)} if path.is_file() else set()
    hits = retriever.retrieve([q["question"] for q in questions], max(ks) + 2)
    mode = get_mode("parametric")
    with JsonlAppender(path) as log:
        for k in ks:
            todo = [(q, h) for q, h in zip(questions, hits) if (q["id"], k) not in done]
            if not todo:
                continue
            sets = []
            for q, h in todo:
                ids = list(q["docs"])
                ids += [x.doc.id for x in h if x.doc.id not in ids]
                sets.append(ids[:k])
            prepared = [merged.get(ids) for ids in sets]
            gens = engine.generate([mode.messages(q["question"], []) for q, _ in todo], prepared, max_tokens=max_tokens)
            rows = []
            for (q, _), ids, g in zip(todo, sets, gens):
                answer = extract_answer(g.text)
                em, f1 = best_scores(answer, q["answers"])
                rows.append({"id": q["id"], "k": k, "type": q["type"], "merged": ids,
                             "gold_in_merge": sum(d in ids for d in q["docs"]), "answer": answer,
                             "generation": g.text, "em": em, "f1": f1,
                             **audit.check(g.text, g.token_ids, g.finish_reason)})
            log.write_many(rows)
    rows = read_jsonl(path, tolerate_torn_tail=True)
    table = {}
    for k in ks:
        mine = [r for r in rows if r["k"] == k]
        entry = {"f1": _mean([r["f1"] for r in mine]), "questions": len(mine),
                 "template_leaks": sum(r["template_leak"] for r in mine)}
        for t in ("single-hop", "two-hop"):
            entry[f"f1_{t}"] = _mean([r["f1"] for r in mine if r["type"] == t])
        table[str(k)] = entry
    return table


def coverage(questions: list[dict], augs: dict, interference_rows: list[dict]) -> dict:
    """Single-hop parametric F1 with the gold document's adapter alone (k=1), split by whether a
    QA pair of that document's augmentation has the gold answer: what an adapter can recall
    comes from its QA pairs far more than from its passage text."""
    from prag_vllm.metrics import normalize_answer

    by_id = {q["id"]: q for q in questions}
    split: dict[str, list[float]] = {"taught": [], "not_taught": []}
    for r in interference_rows:
        q = by_id.get(r["id"])
        if r["k"] != 1 or not q or q["type"] != "single-hop":
            continue
        aug = augs.get(q["docs"][0])
        taught = {normalize_answer(p["answer"]) for p in (aug.qa if aug else [])}
        split["taught" if any(normalize_answer(a) in taught for a in q["answers"]) else "not_taught"].append(r["f1"])
    return {k: {"questions": len(v), "f1": _mean(v)} for k, v in split.items()}


def train_config(spec: str):
    """``recipe[:key=value...]`` (keys: lr, epochs, loss, partners) -> TrainConfig, e.g.
    ``default:lr=1e-3:epochs=5``; ``partners=N``: merge-aware training beside the adapters of
    the same spec without it (trained first where missing). ``merge=POLICY`` is not a training
    setting (:func:`merge_policy`)."""
    from prag_vllm.parameterize import TrainConfig

    name, *opts = spec.split(":")
    kw = {}
    for opt in [o for o in opts if not o.startswith("merge=")]:
        key, _, value = opt.partition("=")
        key = {"loss": "loss_policy", "partners": "merge_partners"}.get(key, key)
        kw[key] = {"lr": float, "epochs": int, "merge_partners": int}.get(key, str)(value)
    return TrainConfig(recipe=name, **kw)


def merge_policy(spec: str) -> str:
    """The spec's ``merge=POLICY`` (how the top-k adapters combine when answering; default: the
    product's, ``merge.DEFAULT_MERGE_POLICY``; runs before 2026-12-06 20:00 UTC used ``sum``)."""
    from prag_vllm.merge import DEFAULT_MERGE_POLICY, check_merge_policy

    return check_merge_policy(next((o[6:] for o in spec.split(":")[1:] if o.startswith("merge=")),
                                   DEFAULT_MERGE_POLICY))


def _mean(v: list[float]) -> float | None:
    return round(sum(v) / len(v), 4) if v else None


def run(args) -> dict:
    from prag_vllm.augment import PROMPT_VERSION, AugmentConfig, augment_corpus, load_augmentations
    from prag_vllm.benchdata import generate, write
    from prag_vllm.corpus import load_corpus
    from prag_vllm.errors import InputError
    from prag_vllm.evaluation.cli import LazyEngine
    from prag_vllm.evaluation.run import EvalConfig, _augmentations_path, prepare, run_eval
    from prag_vllm.evaluation.run import check_borrowed_augmentations as check_borrowed
    from prag_vllm.generate import EngineConfig
    from prag_vllm.models import resolve_model
    from prag_vllm.retrieve.factory import RetrieverConfig, build_retriever

    work, out = Path(args.work).expanduser(), Path(args.out)
    model_path = resolve_model(args.model)
    aug_model = args.augment_model or model_path.name
    acfg = AugmentConfig(n_qa=args.n_qa, distinct_answers=args.distinct_answers)
    results = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "model": model_path.name,
               "augment_model": aug_model,
               "machine": machine(), "command": "python bench/recipes.py " + " ".join(args.argv),
               "fictional": {}, "2wiki": {}}
    jobs = [tuple(j.split("@", 1)) for j in args.jobs.split(",") if j]  # (dataset, recipe spec)
    bad = [j for j in jobs if len(j) != 2 or j[0] not in ("fictional", "2wiki")]
    if bad:
        raise SystemExit(f"bad --jobs entries {bad}: use fictional@RECIPE or 2wiki@RECIPE")
    engine_cfg = EngineConfig(model=str(model_path), max_model_len=4096, max_lora_rank=16, max_loras=8)
    t_start = time.perf_counter()
    fict = None
    with LazyEngine(engine_cfg) as engine:
        for dataset, r in jobs:
            rdir = out / dataset / r.replace(":", "_")
            policy = merge_policy(r)
            if dataset == "fictional":
                if fict is None:  # the corpus, its augmentations and index: once, shared by the recipes
                    fdir = work / f"fictional-{args.fictional_docs}-s{args.seed}"
                    if not (fdir / "questions.jsonl").is_file():
                        write(generate(args.fictional_docs, args.seed), fdir)
                    docs = load_corpus(fdir / "corpus.jsonl")
                    base = dict(datasets=[f"jsonl={fdir / 'questions.jsonl'}"], corpus=str(fdir / "corpus.jsonl"),
                                augment_model=args.augment_model,
                                work_dir=work / "work-fictional", modes=MODES, top_k=3, max_tokens=args.max_tokens,
                                augment=acfg)
                    (frun,) = prepare(EvalConfig(out_dir=out / "fictional" / "x", **base))
                    aug_path = _augmentations_path(frun, aug_model, acfg)
                    if aug_model != model_path.name:
                        have = load_augmentations(aug_path)
                        try:
                            check_borrowed([d for d in docs if d.id not in have], aug_model, aug_path)
                        except InputError as exc:
                            raise SystemExit(str(exc)) from None
                    augs = augment_corpus(docs, engine, aug_path, acfg)
                    retriever = build_retriever(RetrieverConfig(kind="bm25", index_dir=str(frun.ws.index_dir)), docs)
                    fict = read_jsonl(fdir / "questions.jsonl")
                tcfg = train_config(r)
                store = frun.ws.store(model_path, tcfg)  # every document, for the interference runs
                rate = train_all(docs, augs, store, model_path, tcfg, store.root / "bench_timing.json")
                metrics = run_eval(EvalConfig(out_dir=rdir, train=tcfg, merge_policy=policy, **base), engine, model_path)
                entry = {"modes": mode_table(metrics), "train_s_per_doc": rate}
                entry["interference"] = interference(engine, fict, docs, retriever, store, args.ks, rdir,
                                                     args.max_tokens, policy)
                if 1 in args.ks:
                    entry["coverage"] = coverage(fict, augs, read_jsonl(rdir / "interference.jsonl"))
            else:
                wiki = dict(datasets=[args.wiki], out_dir=rdir, work_dir=work / "work", per_type=args.wiki_per_type,
                            modes=MODES, top_k=3, augment=acfg, max_tokens=args.max_tokens,
                            merge_policy=policy)
                tcfg = train_config(r)
                metrics = run_eval(EvalConfig(train=tcfg, **wiki), engine, model_path)
                (ds,) = metrics["datasets"].values()
                rate = (ds["offline"]["train_s_per_doc"].get(tcfg.recipe) or {}).get("random")
                entry = {"modes": mode_table(metrics), "train_s_per_doc": round(rate, 2) if rate else None}
            entry.update(model=model_path.name, augment_model=aug_model,
                         epochs=tcfg.epochs, merge_partners=tcfg.merge_partners, merge_policy=policy,
                         loss_policy=tcfg.loss_policy, lr=tcfg.lr, augment_prompt=PROMPT_VERSION,
                         n_qa=args.n_qa, distinct_answers=args.distinct_answers, date=datetime.now(timezone.utc).isoformat(timespec="seconds"))
            results[dataset][r] = entry
            atomic_write_json(out.with_suffix(".partial.json"), results)
            logger.info("%s %s: %s", dataset, r, json.dumps(entry["modes"]))
    results["wall_s"] = round(time.perf_counter() - t_start)
    return results


def merge(paths: list[Path]) -> dict:
    """One result from several runs' JSON (each entry keeps its ``date`` and ``augment_prompt``);
    a later run's entry replaces an earlier one of the same recipe and augmentation, and an earlier
    entry of another augmentation stays, renamed ``RECIPE (aug vN)``."""
    out: dict = {"fictional": {}, "2wiki": {}, "merged_from": []}
    for path in paths:
        res = json.loads(path.read_text())
        out.update({k: res[k] for k in ("model", "machine", "date") if k in res})
        out["merged_from"].append({"file": path.name, "command": res.get("command"), "date": res.get("date"),
                                   "wall_s": res.get("wall_s")})
        for ds in ("fictional", "2wiki"):
            for r, e in res.get(ds, {}).items():
                e.setdefault("date", res.get("date"))
                e.setdefault("model", res.get("model"))
                old = out[ds].get(r)
                if old is not None and old.get("augment_prompt") != e.get("augment_prompt"):
                    out[ds][f"{r} (aug v{old.get('augment_prompt')})"] = out[ds].pop(r)
                out[ds][r] = e
    out["command"] = "python bench/recipes.py --merge " + " ".join(p.name for p in paths)
    return out


def report(res: dict) -> str:
    m = res["machine"]
    lines = [f"# Training recipes: knowledge injection ({res['model']})", "",
             f"{res['date']}, {m['cpu']} ({', '.join(m['isa'])}), {m['cores']} cores; "
             + ("merged runs:" if "merged_from" in res else f"wall {res.get('wall_s', 'not finished: partial results')} s."),
             f"Command: `{res['command']}`", ""]
    for run in res.get("merged_from", []):
        lines.insert(-1, f"- `{run['file']}`: {run['date']}, `{run['command']}`, "
                         f"wall {run['wall_s'] if run['wall_s'] is not None else 'not finished (partial)'} s")
    for ds in ("fictional", "2wiki"):
        if not res[ds]:
            continue
        lines += [f"## {ds}", "", "| recipe | mode | F1 | EM | template leaks | hit max_tokens | questions |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for r, e in res[ds].items():
            for mode, v in e["modes"].items():
                lines.append(f"| {r} | {mode} | {v['f1']:.3f} | {v['em']:.3f} | {v['template_leaks']} "
                             f"| {v['hit_max_tokens']} | {v['questions']} |")
        lines += ["", "| recipe | ran as | model | loss policy | epochs | lr | augmentation | QA pairs | train s/doc | run |",
                  "|---|---|---|---|---:|---:|---:|---:|---:|---|"]
        lines += [f"| {r} | {e.get('ran_as', r)} | {e.get('model', res['model'])} | {e['loss_policy']} | {e['epochs']} "
                  f"| {e['lr']} | v{e.get('augment_prompt', '?')} | {e.get('n_qa', 3)} | {e['train_s_per_doc']} "
                  f"| {e.get('date', '')} |" for r, e in res[ds].items()]
        if ds == "fictional":
            lines += ["", "Merge interference (parametric, gold documents forced into a merge of k):", "",
                      "| recipe | k | F1 | F1 single-hop | F1 two-hop | template leaks |", "|---|---:|---:|---:|---:|---:|"]
            for r, e in res[ds].items():
                for k, v in e["interference"].items():
                    lines.append(f"| {r} | {k} | {v['f1']} | {v['f1_single-hop']} | {v['f1_two-hop']} "
                                 f"| {v['template_leaks']} |")
            cov = {r: e["coverage"] for r, e in res[ds].items() if e.get("coverage")}
            if cov:
                lines += ["", "Single-hop questions, gold adapter alone (k=1), by whether one of the document's "
                          "QA pairs has the answer:", "",
                          "| recipe | taught: questions | taught: F1 | not taught: questions | not taught: F1 |",
                          "|---|---:|---:|---:|---:|"]
                lines += [f"| {r} | {c['taught']['questions']} | {c['taught']['f1']} | {c['not_taught']['questions']} "
                          f"| {c['not_taught']['f1']} |" for r, c in cov.items()]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import os
    import sys

    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cache = Path(os.environ.get("PRAG_CACHE_DIR", "~/.cache/prag-vllm")).expanduser()
    p.add_argument("--jobs", default="fictional@default,2wiki@default,fictional@paper,2wiki@paper,fictional@distill",
                   help="DATASET@RECIPE[:lr=..:epochs=..:loss=..:partners=..:merge=sum|mean], run in this order")
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--augment-model", default=None,
                   help="fictional jobs: train on the augmentations this model wrote (they must exist), so that "
                        "two models are compared on the same training text")
    p.add_argument("--fictional-docs", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ks", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 3, 5])
    p.add_argument("--wiki", default=str(Path(__file__).resolve().parents[2] / "shared/data/2wikimultihopqa/dev_sample.json"))
    p.add_argument("--wiki-per-type", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--n-qa", type=int, default=3, help="QA pairs per document (augmentation; use another --work "
                   "for another value: adapters of one recipe share a store, and stale ones are trained again)")
    p.add_argument("--distinct-answers", action="store_true",
                   help="augmentation keeps one QA pair per answer (AugmentConfig.distinct_answers)")
    p.add_argument("--work", default=str(cache / "bench" / "recipes"))
    p.add_argument("--out", default="docs/results/recipes")
    p.add_argument("--report-only", action="store_true",
                   help="write OUT.json/.md from the finished jobs of an interrupted run (OUT.partial.json)")
    p.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                   help="write OUT.json/.md from these runs' results (OUT.json or OUT.partial.json of each), in order")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    out = Path(args.out)
    if args.merge:
        res = merge(args.merge)
    else:
        res = json.loads(out.with_suffix(".partial.json").read_text()) if args.report_only else run(args)
    atomic_write_json(out.with_suffix(".json"), res)
    atomic_write_text(out.with_suffix(".md"), report(res))
    print(report(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
