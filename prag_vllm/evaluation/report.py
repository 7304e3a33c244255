"""Outputs of ``prag eval``: predictions, metrics JSON, Markdown report (the paper's Table 1
and Table 4 layouts, the differences with paired bootstrap intervals, an error analysis) and
PNG plots, all rebuilt from the resumable per-run answer logs.

``metrics.json``: ``{model, date, settings, datasets: {name: {format, file, questions,
subtypes, rows, errors, offline}}, comparisons, timings}``. Each of ``rows`` is one table row
(``label``, ``mode``, ``recipe`` and ``init`` -- None for the modes without adapters --,
``f1``/``em``/``n`` per sub-type and ``total``, ``f1_ci``, latency, prompt tokens, audit
counts); each of ``comparisons`` one difference (:mod:`prag_vllm.evaluation.compare`):
``{dataset, kind, a, b, metric, diff, ci_low, ci_high, n, level, distinguishable}``.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path

from prag_vllm.audit import count
from prag_vllm.evaluation.compare import (
    RowSpec,
    comparisons,
    differences_markdown,
    error_analysis,
    errors_markdown,
    mean_interval,
    row_key,
)
from prag_vllm.evaluation.settings import answer_log, train_settings
from prag_vllm.fileio import atomic_write_json, atomic_write_text, read_jsonl
from prag_vllm.modes import MODES

logger = logging.getLogger(__name__)
TOTAL = "total"


def adapter_suffix(recipe: str, init: str, recipes: list[str], inits: list[str]) -> str:
    """What tells one adapter set's rows from the others': the recipe when several ran, the init when both."""
    return ", ".join([recipe] * (len(recipes) > 1) + [init] * (len(inits) > 1))


def row_specs(modes: list[str], inits: list[str], recipes: list[str] | None = None) -> list[RowSpec]:
    """One :class:`~prag_vllm.evaluation.compare.RowSpec` per table row, modes in the canonical
    order; adapter modes once per recipe and init (labelled ``parametric (paper, warmup)``)."""
    recipes = recipes or ["default"]
    out = []
    for m in (m for m in MODES if m in modes):
        if MODES[m].parametric:
            for r in recipes:
                for i in inits:
                    suffix = adapter_suffix(r, i, recipes, inits)
                    out.append(RowSpec(f"{m} ({suffix})" if suffix else m, m, r, i))
        else:
            out.append(RowSpec(m, m))
    return out


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def score_rows(rows: list[dict], subtypes: list[str], specs: list[RowSpec], intervals: bool = True) -> list[dict]:
    """Per table row: F1/EM per sub-type and in total (with a bootstrap 95% interval of the mean F1),
    counts, mean latency and prompt tokens, template leaks and answers cut at max_tokens."""
    table = []
    for spec in specs:
        mine = [r for r in rows if row_key(r) == spec.key]
        entry = {"label": spec.label, "mode": spec.mode, "recipe": spec.recipe, "init": spec.init,
                 "f1": {}, "em": {}, "n": {}, "f1_ci": {},
                 "latency_s": _mean([r["latency_s"] for r in mine]),
                 "prompt_tokens": _mean([r["prompt_tokens"] for r in mine]), **count(mine)}
        for col in [*subtypes, TOTAL]:
            scored = [r for r in mine if "f1" in r and (col == TOTAL or r.get("type") == col)]
            entry["n"][col] = len(scored)
            entry["f1"][col] = _mean([r["f1"] for r in scored])
            entry["em"][col] = _mean([r["em"] for r in scored])
            entry["f1_ci"][col] = mean_interval([r["f1"] for r in scored]) if intervals else None
        table.append(entry)
    return table


def _rate(node: dict | None) -> float | None:
    return node["seconds"] / node["docs"] if node and node.get("docs") else None


def offline_costs(name: str, n_questions: int, n_docs: int, timings: dict, inits: list[str],
                  recipes: list[str] | None = None) -> dict:
    """Augmentation and training seconds per document, and amortized per evaluated question
    (training: ``{recipe: {init: seconds}}``)."""
    t = timings.get(name, {})
    aug = _rate(t.get("augment"))
    train = {r: {i: _rate(t.get("train", {}).get(r, {}).get(i)) for i in inits} for r in recipes or ["default"]}

    def per_q(rate: float | None) -> float | None:
        return rate * n_docs / n_questions if rate is not None and n_questions else None

    return {"documents": n_docs, "questions": n_questions, "augment_s_per_doc": aug,
            "augment_s_per_question": per_q(aug), "train_s_per_doc": train,
            "train_s_per_question": {r: {i: per_q(v) for i, v in by.items()} for r, by in train.items()}}


def audit_markdown(metrics: dict) -> str:
    """Per dataset and table row: answers with template leaks and answers that hit max_tokens."""
    lines = ["| dataset | mode | answers | template leaks | hit max_tokens |", "|---|---|---:|---:|---:|"]
    for name, ds in metrics["datasets"].items():
        for e in ds["rows"]:
            lines.append(f"| {name} | {e['label']} | {e['n'][TOTAL]} | {e.get('template_leaks', 0)} "
                         f"| {e.get('hit_max_tokens', 0)} |")
    return "\n".join(lines)


def _f(v: float | None, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def score_markdown(metrics: dict, key: str) -> str:
    """``key`` (f1 or em) per table row and per dataset sub-type and total (the paper's Table 1)."""
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
    """Seconds per question per table row, and the speed-up vs standard RAG (the paper's Table 4)."""
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


def offline_markdown(metrics: dict) -> str:
    """Per dataset: documents retrieved, augmentation and training seconds per document and per question."""
    sets = [(r, i) for r in metrics["settings"]["recipes"] for i in metrics["settings"]["inits"]]
    names = [f"({r}, {i})" for r, i in sets]
    lines = ["| dataset | questions | documents retrieved | augmentation s/doc | "
             + " | ".join(f"training s/doc {n}" for n in names)
             + " | augmentation s/question | " + " | ".join(f"training s/question {n}" for n in names) + " |",
             "|---|---:|---:|---:|" + "---:|" * (2 * len(sets) + 1)]
    for name, d in metrics["datasets"].items():
        c = d["offline"]
        lines.append(f"| {name} | {c['questions']} | {c['documents']} | {_f(c['augment_s_per_doc'], 1)} | "
                     + " | ".join(_f(c["train_s_per_doc"][r][i], 1) for r, i in sets)
                     + f" | {_f(c['augment_s_per_question'], 1)} | "
                     + " | ".join(_f(c["train_s_per_question"][r][i], 1) for r, i in sets) + " |")
    return "\n".join(lines)


def _recipes_line(train: dict) -> str:
    return ", ".join(f"{r} (loss {t.get('loss_policy')}, lr {t['lr']}, {t['epochs']} epoch{'s' * (t['epochs'] != 1)})"
                     for r, t in train.items())


def _per_type_text(per_type: int | list[int], datasets: dict) -> str:
    """``15`` or ``15 (2wikimultihopqa), 30 (hotpotqa)`` for a count per dataset."""
    if isinstance(per_type, int):
        return str(per_type)
    return ", ".join(f"{n} ({name})" for n, name in zip(per_type, datasets))


def render_report(metrics: dict) -> str:
    """report.md: every table of the run, then the plots and the method."""
    s = metrics["settings"]
    warm = metrics["timings"].get("warmup")
    first = next(iter(s["train"].values()))
    parts = [
        f"# Evaluation: {metrics['model']}",
        "",
        f"{metrics['date']}. Top-k {s['top_k']}; LoRA r={first['rank']}, alpha={first['alpha']}; "
        f"recipe{'s' * (len(s['train']) > 1)} {_recipes_line(s['train'])}; init: {', '.join(s['inits'])}; "
        f"questions: {'first ' + str(s['limit']) if s['limit'] else ''}"
        f"{'first ' + _per_type_text(s['per_type'], metrics['datasets']) + ' per sub-type' if s['per_type'] else ''}"
        f"{'all' if not s['limit'] and not s['per_type'] else ''}; max {s['max_tokens']} answer tokens.",
        "",
        "## F1 (layout of the paper's Table 1)", "", score_markdown(metrics, "f1"), "",
        "## Exact match", "", score_markdown(metrics, "em"), "",
        "## Differences", "",
        "Mean per-question F1 difference a − b over the questions both answered, with a paired bootstrap "
        "95% interval (10,000 resamples of the questions; both modes keep their own answer to each drawn "
        "question). A difference is distinguishable from zero when its interval excludes 0.", "",
        differences_markdown(metrics), "",
        "## Error analysis", "",
        "Where parametric answering beats standard RAG and where it loses (F1 per question).", "",
        errors_markdown(metrics), "",
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
        offline_markdown(metrics), "",
    ]
    if warm:
        parts += [f"Warm-up LoRA: {warm['pairs']:.0f} QA pairs, {warm['seconds']:.0f} s.", ""]
    parts += ["## Plots", "", "![F1 per mode](f1.png)", "", "![Latency per mode](latency.png)", ""]
    if metrics.get("comparisons"):
        parts += ["![Differences with 95% intervals](diffs.png)", ""]
    parts += ["## Method", "",
              "F1/EM: SQuAD normalization (lower case, punctuation and articles removed), maximum over the "
              "gold aliases; yes/no answers score only on an exact match. The answer is the first line of "
              "the generation without an `Answer:` label, never cut at a comma (`prag_vllm/metrics.py`). "
              "Retrieval: BM25 over the closed corpus (the files' pooled `context` paragraphs unless "
              "`--corpus` was given), so absolute numbers are not comparable to the paper's (DPR Wikipedia). "
              "Intervals: percentile bootstrap over questions (`prag_vllm/evaluation/bootstrap.py`, seed 0); "
              "the F1 plot's bars carry the interval of each mean, the differences plot the paired ones."]
    return "\n".join(parts) + "\n"


def load_rows(out: Path, run, cfg) -> list[dict]:
    """The rows of ``run`` (a :class:`~prag_vllm.evaluation.run.DatasetRun`) for ``cfg``'s modes,
    recipes and inits, each tagged with dataset, recipe and init, in question order per log and mode."""
    position = {q.id: n for n, q in enumerate(run.questions)}
    order = {m: n for n, m in enumerate(MODES)}
    logs = [(None, None)] + [(r, i) for r in cfg.recipes for i in cfg.inits]
    rows = []
    for recipe, init in logs:
        path = answer_log(out, run.name, recipe, init)
        if not path.is_file():
            continue
        mine = [{"dataset": run.name, "recipe": recipe, "init": init, **row}
                for row in read_jsonl(path, tolerate_torn_tail=True) if row["id"] in position and row["mode"] in cfg.modes]
        rows += sorted(mine, key=lambda r: (order[r["mode"]], position[r["id"]]))
    return rows


def write_outputs(cfg, runs, out: Path, model_name: str, timings: dict, needed: dict[str, int]) -> dict:
    """Rebuild predictions.jsonl, metrics.json, report.md and the plots from the answer logs."""
    from dataclasses import asdict

    from prag_vllm.evaluation.plots import plot

    specs = row_specs(cfg.modes, cfg.inits, cfg.recipes)
    all_rows, by_dataset, datasets = [], {}, {}
    for run in runs:
        rows = by_dataset[run.name] = load_rows(out, run, cfg)
        all_rows += rows
        datasets[run.name] = {"format": run.data.name, "file": str(run.data.path), "questions": len(run.questions),
                              "subtypes": run.subtypes, "rows": score_rows(rows, run.subtypes, specs),
                              "errors": error_analysis(rows, specs),
                              "offline": offline_costs(run.name, len(run.questions), needed.get(run.name, 0),
                                                       timings, cfg.inits, cfg.recipes)}
    metrics = {"model": model_name, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "settings": {"top_k": cfg.top_k, "modes": cfg.modes, "recipes": cfg.recipes, "inits": cfg.inits,
                            "limit": cfg.limit, "per_type": cfg.per_type,
                            "train": {t.recipe: train_settings(t) for t in cfg.trains}, "augment": asdict(cfg.augment),
                            "max_tokens": cfg.max_tokens, "warmup_size": cfg.warmup_size,
                            "warmup_epochs": cfg.warmup_epochs},
               "datasets": datasets, "comparisons": comparisons(by_dataset, specs), "timings": timings}
    atomic_write_text(out / "predictions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in all_rows))
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_text(out / "report.md", render_report(metrics))
    written = plot(metrics, out)
    logger.info("wrote %s (predictions.jsonl, metrics.json, report.md, %s)", out, ", ".join(written))
    return metrics
