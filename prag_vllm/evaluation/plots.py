"""The plots of ``prag eval`` (matplotlib, written atomically): ``f1.png`` (F1 per mode with
bootstrap 95% intervals), ``latency.png`` (seconds per question) and ``diffs.png`` (the
compared differences with their paired bootstrap 95% intervals)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

TOTAL = "total"


def _save_fig(fig, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _bars(ax, groups: list[str], series: dict[str, list[float | None]],
          intervals: dict[str, list[list[float] | None]] | None = None) -> None:
    width = 0.8 / max(len(series), 1)
    for i, (label, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        heights = [v or 0.0 for v in values]
        err = None
        if intervals and label in intervals:
            cis = [ci if ci is not None and v is not None else [h, h]
                   for ci, v, h in zip(intervals[label], values, heights)]
            err = [[max(h - ci[0], 0.0) for ci, h in zip(cis, heights)],
                   [max(ci[1] - h, 0.0) for ci, h in zip(cis, heights)]]
        ax.bar(xs, heights, width, label=label, yerr=err, capsize=2 if err else 0,
               error_kw={"elinewidth": 0.8, "ecolor": "0.25"})
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.legend(fontsize=7, ncols=2)


def plot_differences(comparisons: list[dict], title: str, path: Path) -> None:
    """One horizontal bar per difference: the point estimate and its 95% interval; 0 marked."""
    import matplotlib.pyplot as plt

    labels = [f"{c['dataset']}: {c['a']} − {c['b']}  (n={c['n']})" for c in comparisons]
    diffs = [c["diff"] for c in comparisons]
    err = [[c["diff"] - c["ci_low"] for c in comparisons], [c["ci_high"] - c["diff"] for c in comparisons]]
    colors = ["tab:blue" if c["distinguishable"] else "0.55" for c in comparisons]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(comparisons) + 1.4))
    ys = list(range(len(comparisons)))[::-1]
    for y, d, lo, hi, color in zip(ys, diffs, err[0], err[1], colors):
        ax.errorbar(d, y, xerr=[[lo], [hi]], fmt="o", color=color, capsize=3)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(ys, labels, fontsize=8)
    ax.set_xlabel("F1 difference (paired bootstrap 95% interval; blue: excludes 0)")
    ax.set_title(title)
    _save_fig(fig, path)
    plt.close(fig)


def plot(metrics: dict, out: Path) -> list[str]:
    """Write the plots into ``out``; returns their file names (``diffs.png`` only with comparisons)."""
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
    _bars(ax, [f"{n}\n{c}" for n, c in cols],
          {lb: [value(n, lb, lambda e, c=c: e["f1"][c]) for n, c in cols] for lb in labels},
          {lb: [value(n, lb, lambda e, c=c: e.get("f1_ci", {}).get(c)) for n, c in cols] for lb in labels})
    ax.set_ylabel("F1 (bootstrap 95% interval)")
    ax.set_title(f"F1 per mode — {metrics['model']}")
    _save_fig(fig, out / "f1.png")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(ds) + 3), 4))
    _bars(ax, list(ds), {lb: [value(n, lb, lambda e: e["latency_s"]) for n in ds] for lb in labels})
    ax.set_ylabel("seconds per question")
    ax.set_title(f"Answering latency per mode — {metrics['model']}")
    _save_fig(fig, out / "latency.png")
    plt.close(fig)
    written = ["f1.png", "latency.png"]
    if metrics.get("comparisons"):
        plot_differences(metrics["comparisons"], f"Differences in F1 — {metrics['model']}", out / "diffs.png")
        written.append("diffs.png")
    return written
