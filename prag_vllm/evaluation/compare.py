"""Differences that matter in ``prag eval``, with paired bootstrap intervals, and where
parametric answering wins and loses against standard RAG (the error analysis).

Compared pairs, per dataset (each only when both sides ran):

- per recipe and init: parametric − closed-book (does the adapter add knowledge?),
  combined − standard (does it add to the passages?), parametric − standard (can it
  replace them?);
- per pair of recipes, in the order given (``--recipe default,paper``: default − paper),
  and per init: parametric and combined;
- per recipe, when both inits ran: warm-up − random, parametric and combined.

Each difference is the mean over the questions both sides answered of the per-question
F1 difference, with a paired bootstrap 95% interval (:mod:`prag_vllm.evaluation.bootstrap`,
10,000 resamples of the questions, seeded). It is *distinguishable from zero* when the
interval excludes 0.
"""

from __future__ import annotations

from typing import NamedTuple

from prag_vllm.evaluation.bootstrap import DEFAULT_RESAMPLES, paired_bootstrap, paired_scores

MODE_PAIRS = (("parametric", "closed-book"), ("combined", "standard"), ("parametric", "standard"))
"""(a, b) mode differences a − b, per recipe and init."""
COMPARED_ADAPTER_MODES = ("parametric", "combined")
"""The modes compared between recipes and between inits."""
N_EXAMPLES = 10
"""Questions shown per side (wins, losses) in the error analysis."""
MEAN_RESAMPLES = 2_000
"""Resamples of the interval of one mode's mean F1 (the differences get ``DEFAULT_RESAMPLES``)."""


class RowSpec(NamedTuple):
    """One row of the tables: a mode, and for the adapter modes its recipe and init."""

    label: str
    mode: str
    recipe: str | None = None
    init: str | None = None

    @property
    def key(self) -> tuple:
        return self.mode, self.recipe, self.init


def row_key(row: dict) -> tuple:
    """The :attr:`RowSpec.key` an answer row belongs to."""
    return row["mode"], row.get("recipe"), row.get("init")


def _find(specs: list[RowSpec], mode: str, recipe: str | None = None, init: str | None = None) -> RowSpec | None:
    return next((s for s in specs if s.key == (mode, recipe, init)), None)


def comparison_pairs(specs: list[RowSpec]) -> list[tuple[str, RowSpec, RowSpec]]:
    """(kind, a, b) for every difference a − b worth an interval: kind ``mode``, ``recipe`` or ``init``."""
    recipes = list(dict.fromkeys(s.recipe for s in specs if s.recipe))
    inits = list(dict.fromkeys(s.init for s in specs if s.init))
    pairs = [("mode", _find(specs, ma, r, i), _find(specs, mb)) for r in recipes for i in inits
             for ma, mb in MODE_PAIRS]
    pairs += [("recipe", _find(specs, m, ra, i), _find(specs, m, rb, i))
              for x, ra in enumerate(recipes) for rb in recipes[x + 1:] for i in inits for m in COMPARED_ADAPTER_MODES]
    if "random" in inits and "warmup" in inits:
        pairs += [("init", _find(specs, m, r, "warmup"), _find(specs, m, r, "random"))
                  for r in recipes for m in COMPARED_ADAPTER_MODES]
    return [(kind, a, b) for kind, a, b in pairs if a is not None and b is not None]


def comparisons(rows_by_dataset: dict[str, list[dict]], specs: list[RowSpec], metric: str = "f1",
                resamples: int = DEFAULT_RESAMPLES) -> list[dict]:
    """Every :func:`comparison_pairs` difference per dataset: ``{dataset, kind, a, b, metric, diff,
    ci_low, ci_high, n, level, distinguishable}`` (``a``/``b``: the table row labels)."""
    out = []
    for name, rows in rows_by_dataset.items():
        for kind, a, b in comparison_pairs(specs):
            xa, xb = paired_scores(rows, a.key, b.key, metric, key=row_key)
            if not xa:
                continue
            res = paired_bootstrap(xa, xb, resamples=resamples).to_dict()
            res.update({k: round(res[k], 5) for k in ("diff", "ci_low", "ci_high")})
            out.append({"dataset": name, "kind": kind, "a": a.label, "b": b.label, "metric": metric, **res})
    return out


def mean_interval(values: list[float], resamples: int = MEAN_RESAMPLES) -> list[float] | None:
    """Bootstrap 95% interval of the mean of ``values`` (None if empty); for the error bars of the
    F1 plot, one per table cell, hence fewer resamples than the differences."""
    if not values:
        return None
    res = paired_bootstrap(values, [0.0] * len(values), resamples=resamples)
    return [round(res.ci_low, 5), round(res.ci_high, 5)]


def _example(ra: dict, rb: dict) -> dict:
    return {"id": ra["id"], "type": ra.get("type"), "question": ra["question"], "answers": ra.get("answers", []),
            "a_answer": ra["answer"], "b_answer": rb["answer"], "a_f1": ra["f1"], "b_f1": rb["f1"]}


def error_analysis(rows: list[dict], specs: list[RowSpec], n_examples: int = N_EXAMPLES) -> list[dict]:
    """Per parametric row (recipe, init) vs standard RAG: wins, losses and ties by F1, and the
    ``n_examples`` questions with the largest gain and the largest loss (ties by question order)."""
    std = _find(specs, "standard")
    out = []
    for a in (s for s in specs if s.mode == "parametric") if std else []:
        mine = {r["id"]: r for r in rows if row_key(r) == a.key and "f1" in r}
        theirs = {r["id"]: r for r in rows if row_key(r) == std.key and "f1" in r}
        both = [(pos, mine[i], theirs[i]) for pos, i in enumerate(mine) if i in theirs]
        wins = sorted((t for t in both if t[1]["f1"] > t[2]["f1"]), key=lambda t: (t[2]["f1"] - t[1]["f1"], t[0]))
        losses = sorted((t for t in both if t[1]["f1"] < t[2]["f1"]), key=lambda t: (t[1]["f1"] - t[2]["f1"], t[0]))
        out.append({"a": a.label, "b": std.label, "n": len(both), "wins": len(wins), "losses": len(losses),
                    "ties": len(both) - len(wins) - len(losses),
                    "win_examples": [_example(ra, rb) for _, ra, rb in wins[:n_examples]],
                    "loss_examples": [_example(ra, rb) for _, ra, rb in losses[:n_examples]]})
    return out


def _cell(text: object, limit: int = 120) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _signed(v: float) -> str:
    return f"{v:+.3f}"


def differences_markdown(metrics: dict) -> str:
    """The comparisons as a table, then one sentence each: distinguishable from zero or not."""
    comps = metrics.get("comparisons", [])
    if not comps:
        return "No pair of modes with answers on the same questions."
    lines = ["| dataset | difference | F1 diff | 95% interval | questions | distinguishable from 0 |",
             "|---|---|---:|---|---:|---|"]
    lines += [f"| {c['dataset']} | {c['a']} − {c['b']} | {_signed(c['diff'])} | "
              f"[{_signed(c['ci_low'])}, {_signed(c['ci_high'])}] | {c['n']} | {'yes' if c['distinguishable'] else 'no'} |"
              for c in comps]
    lines.append("")
    for c in comps:
        if c["distinguishable"]:
            verdict = (f"distinguishable from zero: {c['a'] if c['diff'] > 0 else c['b']} is better "
                       f"on these {c['n']} questions")
        else:
            verdict = f"not distinguishable from zero at n={c['n']} (the interval contains 0)"
        lines.append(f"- {c['dataset']}, {c['a']} − {c['b']}: {_signed(c['diff'])} F1 "
                     f"(95% interval {_signed(c['ci_low'])} to {_signed(c['ci_high'])}), {verdict}.")
    n_dist = sum(c["distinguishable"] for c in comps)
    lines += ["", f"Distinguishable from zero at this sample size: {n_dist} of {len(comps)} differences."]
    return "\n".join(lines)


def errors_markdown(metrics: dict) -> str:
    """Per dataset and parametric row: counts of wins/losses/ties vs standard RAG and the examples."""
    parts = []
    for name, ds in metrics["datasets"].items():
        for e in ds.get("errors", []):
            parts += [f"### {name}: {e['a']} vs {e['b']}", "",
                      f"Of {e['n']} questions, {e['a']} scores a higher F1 on {e['wins']}, a lower one on "
                      f"{e['losses']}, the same on {e['ties']}.", ""]
            for side, examples in (("wins", e["win_examples"]), ("losses", e["loss_examples"])):
                if not examples:
                    continue
                parts += [f"{len(examples)} {side} (largest F1 difference first):", "",
                          f"| id | type | question | gold | {e['a']} | F1 | {e['b']} | F1 |",
                          "|---|---|---|---|---|---:|---|---:|"]
                parts += [f"| {_cell(x['id'], 24)} | {_cell(x['type'] or '–', 20)} | {_cell(x['question'])} "
                          f"| {_cell(' / '.join(x['answers'][:3]), 60)} | {_cell(x['a_answer'])} | {x['a_f1']:.2f} "
                          f"| {_cell(x['b_answer'])} | {x['b_f1']:.2f} |" for x in examples]
                parts.append("")
    return "\n".join(parts).rstrip() or "No parametric and standard answers to compare."
