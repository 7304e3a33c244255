"""Outputs of ``prag eval``: predictions, metrics JSON, Markdown report (the paper's Table 1
and Table 4 layouts) and PNG plots, all rebuilt from the resumable per-run answer logs."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from prag_vllm.audit import count
from prag_vllm.fileio import atomic_write_json, atomic_write_text, read_jsonl
from prag_vllm.modes import MODES

logger = logging.getLogger(__name__)
TOTAL = "total"


def row_specs(modes: list[str], inits: list[str]) -> list[tuple[str, str, str | None]]:
    """(label, mode, init) per table row, modes in the canonical order; adapter modes once per init."""
    out = []
    for m in (m for m in MODES if m in modes):
        if MODES[m].parametric:
            out += [(m if len(inits) == 1 else f"{m} ({i})", m, i) for i in inits]
        else:
            out.append((m, m, None))
    return out


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def score_rows(rows: list[dict], subtypes: list[str], specs) -> list[dict]:
    """Per table row: F1/EM per sub-type and in total, counts, mean latency and prompt tokens."""
    table = []
    for label, mode, init in specs:
        mine = [r for r in rows if r["mode"] == mode and r.get("init") == init]
        entry = {"label": label, "mode": mode, "init": init, "f1": {}, "em": {}, "n": {},
                 "latency_s": _mean([r["latency_s"] for r in mine]),
                 "prompt_tokens": _mean([r["prompt_tokens"] for r in mine]), **count(mine)}
        for col in [*subtypes, TOTAL]:
            scored = [r for r in mine if "f1" in r and (col == TOTAL or r.get("type") == col)]
            entry["n"][col] = len(scored)
            entry["f1"][col] = _mean([r["f1"] for r in scored])
            entry["em"][col] = _mean([r["em"] for r in scored])
        table.append(entry)
    return table


def _rate(node: dict | None) -> float | None:
    return node["seconds"] / node["docs"] if node and node.get("docs") else None


def offline_costs(name: str, n_questions: int, n_docs: int, timings: dict, inits: list[str]) -> dict:
    """Augmentation and training seconds per document, and amortized per evaluated question."""
    t = timings.get(name, {})
    aug = _rate(t.get("augment"))
    train = {i: _rate(t.get("train", {}).get(i)) for i in inits}

    def per_q(rate: float | None) -> float | None:
        return rate * n_docs / n_questions if rate is not None and n_questions else None

    return {"documents": n_docs, "questions": n_questions, "augment_s_per_doc": aug,
            "augment_s_per_question": per_q(aug), "train_s_per_doc": train,
            "train_s_per_question": {i: per_q(r) for i, r in train.items()}}


def audit_markdown(metrics: dict) -> str:
    """Per dataset and mode: answers with template leaks and answers that hit max_tokens."""
    lines = ["| dataset | mode | answers | template leaks | hit max_tokens |", "|---|---|---:|---:|---:|"]
    for name, ds in metrics["datasets"].items():
        for e in ds["rows"]:
            lines.append(f"| {name} | {e['label']} | {e['n'][TOTAL]} | {e.get('template_leaks', 0)} "
                         f"| {e.get('hit_max_tokens', 0)} |")
    return "\n".join(lines)


def _f(v: float | None, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def score_markdown(metrics: dict, key: str) -> str:
    cols = [(name, c) for name, d in metrics["datasets"].items() for c in [*d["subtypes"], TOTAL]]
    head = "| mode | " + " | ".join(f"{n} {c} (n={metrics['datasets'][n]['rows'][0]['n'][c]})"
                                    if metrics["datasets"][n]["rows"] else f"{n} {c}" for n, c in cols) + " |"
    lines = [head, "|---|" + "---:|" * len(cols)]
    labels = [s["label"] for d in metrics["datasets"].values() for s in d["rows"]]
    for label in dict.fromkeys(labels):
        cells = []
        for n, c in cols:
            entry = next((s for s in metrics["datasets"][n]["rows"] if s["label"] == label), None)
            cells.append(_f(entry[key][c]) if entry else "–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def latency_markdown(metrics: dict) -> str:
    names = list(metrics["datasets"])
    lines = ["| mode | " + " | ".join(f"{n} s/question | {n} speed-up vs standard" for n in names) + " |",
             "|---|" + "---:|---:|" * len(names)]
    labels = dict.fromkeys(s["label"] for d in metrics["datasets"].values() for s in d["rows"])
    for label in labels:
        cells = []
        for n in names:
            rows = metrics["datasets"][n]["rows"]
            entry = next((s for s in rows if s["label"] == label), None)
            std = next((s["latency_s"] for s in rows if s["mode"] == "standard"), None)
            lat = entry["latency_s"] if entry else None
            cells += [_f(lat), f"{std / lat:.2f}×" if lat and std else "–"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def offline_markdown(metrics: dict, inits: list[str]) -> str:
    lines = ["| dataset | questions | documents retrieved | augmentation s/doc | "
             + " | ".join(f"training s/doc ({i})" for i in inits)
             + " | augmentation s/question | " + " | ".join(f"training s/question ({i})" for i in inits) + " |",
             "|---|---:|---:|---:|" + "---:|" * (2 * len(inits) + 1)]
    for name, d in metrics["datasets"].items():
        c = d["offline"]
        lines.append(f"| {name} | {c['questions']} | {c['documents']} | {_f(c['augment_s_per_doc'], 1)} | "
                     + " | ".join(_f(c["train_s_per_doc"][i], 1) for i in inits)
                     + f" | {_f(c['augment_s_per_question'], 1)} | "
                     + " | ".join(_f(c["train_s_per_question"][i], 1) for i in inits) + " |")
    return "\n".join(lines)


def render_report(metrics: dict) -> str:
    s = metrics["settings"]
    warm = metrics["timings"].get("warmup")
    parts = [
        f"# Evaluation: {metrics['model']}",
        "",
        f"{metrics['date']}. Top-k {s['top_k']}; LoRA r={s['train']['rank']}, alpha={s['train']['alpha']}, "
        f"recipe {s['train'].get('recipe', 'default')} (loss {s['train'].get('loss_policy')}), "
        f"lr {s['train']['lr']}, {s['train']['epochs']} epoch(s), init: {', '.join(s['inits'])}; "
        f"questions: {'first ' + str(s['limit']) if s['limit'] else ''}"
        f"{'first ' + str(s['per_type']) + ' per sub-type' if s['per_type'] else ''}"
        f"{'all' if not s['limit'] and not s['per_type'] else ''}; max {s['max_tokens']} answer tokens.",
        "",
        "## F1 (layout of the paper's Table 1)", "", score_markdown(metrics, "f1"), "",
        "## Exact match", "", score_markdown(metrics, "em"), "",
        "## Clean answers", "",
        "Answers with template or system-prompt text, and answers cut at max_tokens (never ended their turn); "
        "scores are not truncated at commas or periods, so these count against F1 too.", "",
        audit_markdown(metrics), "",
        "## Answering latency (layout of the paper's Table 4)", "",
        "Seconds per question: retrieval + merge of this question, plus its share of its vLLM batch "
        "(batches never mix modes). Speed-up = standard RAG's seconds / the mode's.", "",
        latency_markdown(metrics), "",
        "## Offline cost", "",
        "Only the documents the evaluated questions retrieve are augmented and parameterized. "
        "Per question = per-document seconds × documents retrieved / questions.", "",
        offline_markdown(metrics, s["inits"]), "",
    ]
    if warm:
        parts += [f"Warm-up LoRA: {warm['pairs']:.0f} QA pairs, {warm['seconds']:.0f} s.", ""]
    parts += ["## Plots", "", "![F1 per mode](f1.png)", "", "![Latency per mode](latency.png)", "",
              "## Method", "",
              "F1/EM: SQuAD normalization (lower case, punctuation and articles removed), maximum over the "
              "gold aliases; yes/no answers score only on an exact match. The answer is the first line of "
              "the generation without an `Answer:` label, never cut at a comma (`prag_vllm/metrics.py`). "
              "Retrieval: BM25 over the closed corpus (the files' pooled `context` paragraphs unless "
              "`--corpus` was given), so absolute numbers are not comparable to the paper's (DPR Wikipedia)."]
    return "\n".join(parts) + "\n"


def _save_fig(fig, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _bars(ax, groups: list[str], series: dict[str, list[float | None]]) -> None:
    width = 0.8 / max(len(series), 1)
    for i, (label, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [v or 0.0 for v in values], width, label=label)
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.legend(fontsize=7, ncols=2)


def plot(metrics: dict, out: Path) -> None:
    """``f1.png`` (F1 per mode, per dataset and sub-type) and ``latency.png`` (s/question per mode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ds = metrics["datasets"]
    cols = [(n, c) for n, d in ds.items() for c in [*d["subtypes"], TOTAL]]
    labels = list(dict.fromkeys(s["label"] for d in ds.values() for s in d["rows"]))

    def value(n, label, get):
        entry = next((s for s in ds[n]["rows"] if s["label"] == label), None)
        return get(entry) if entry else None

    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cols) + 2), 4))
    _bars(ax, [f"{n}\n{c}" for n, c in cols], {lb: [value(n, lb, lambda e, c=c: e["f1"][c]) for n, c in cols]
                                                for lb in labels})
    ax.set_ylabel("F1")
    ax.set_title(f"F1 per mode — {metrics['model']}")
    _save_fig(fig, out / "f1.png")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(ds) + 3), 4))
    _bars(ax, list(ds), {lb: [value(n, lb, lambda e: e["latency_s"]) for n in ds] for lb in labels})
    ax.set_ylabel("seconds per question")
    ax.set_title(f"Answering latency per mode — {metrics['model']}")
    _save_fig(fig, out / "latency.png")
    plt.close(fig)


def load_rows(out: Path, run, cfg) -> list[dict]:
    """The rows of ``run`` (a :class:`~prag_vllm.evaluation.run.DatasetRun`) for ``cfg``'s modes and
    inits, each tagged with dataset and init."""
    ids = {q.id for q in run.questions}
    rows = []
    for tag in ["base", *cfg.inits]:
        path = out / "runs" / run.name / f"{tag}.jsonl"
        if not path.is_file():
            continue
        for row in read_jsonl(path, tolerate_torn_tail=True):
            if row["id"] in ids and row["mode"] in cfg.modes:
                rows.append({"dataset": run.name, "init": None if tag == "base" else tag, **row})
    return rows


def write_outputs(cfg, runs, out: Path, model_name: str, timings: dict, needed: dict[str, int]) -> dict:
    """Rebuild predictions.jsonl, metrics.json, report.md and the plots from the answer logs."""
    from dataclasses import asdict

    specs = row_specs(cfg.modes, cfg.inits)
    all_rows, datasets = [], {}
    for run in runs:
        rows = load_rows(out, run, cfg)
        all_rows += rows
        datasets[run.name] = {"format": run.data.name, "file": str(run.data.path), "questions": len(run.questions),
                              "subtypes": run.subtypes, "rows": score_rows(rows, run.subtypes, specs),
                              "offline": offline_costs(run.name, len(run.questions), needed.get(run.name, 0),
                                                       timings, cfg.inits)}
    train = {k: v for k, v in asdict(cfg.train).items() if k != "warmup_adapter"}
    metrics = {"model": model_name, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "settings": {"top_k": cfg.top_k, "modes": cfg.modes, "inits": cfg.inits, "limit": cfg.limit,
                            "per_type": cfg.per_type, "train": train, "augment": asdict(cfg.augment),
                            "max_tokens": cfg.max_tokens, "warmup_size": cfg.warmup_size,
                            "warmup_epochs": cfg.warmup_epochs},
               "datasets": datasets, "timings": timings}
    atomic_write_text(out / "predictions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in all_rows))
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_text(out / "report.md", render_report(metrics))
    plot(metrics, out)
    logger.info("wrote %s (predictions.jsonl, metrics.json, report.md, f1.png, latency.png)", out)
    return metrics
