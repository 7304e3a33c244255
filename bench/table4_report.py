"""Markdown tables and target checks for bench/table4.py results."""

from __future__ import annotations

NAN = float("nan")


def _get(d: dict, *keys, default=NAN):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def targets(result: dict, ops: str = "prag") -> list[tuple[str, str, float, bool]]:
    """(target, how it is computed, value, met) for the issue's four targets."""
    c, ceiling = result["configs"].get(ops, {}), result["configs"].get("no-lora", {})
    overhead = _get(c, "batch", "parametric", "out_tok_s") / _get(ceiling, "batch", "closed-book", "out_tok_s")
    latency = _get(c, "latency", "parametric", "mean_s") / _get(c, "latency", "standard", "mean_s")
    batch = _get(c, "batch", "parametric", "q_s") / _get(c, "batch", "standard", "q_s")
    ready = _get(c, "adapter_ready_ms", "cold", "p50")
    return [
        ("LoRA overhead: parametric throughput >= 0.8x the no-LoRA ceiling",
         "batch output tok/s, parametric / no-LoRA closed-book (same short prompts)", overhead, overhead >= 0.8),
        ("parametric per-question latency <= 0.6x standard RAG", "mean latency, one request at a time", latency,
         latency <= 0.6),
        ("parametric batch throughput >= 1.3x standard RAG", "questions/s, whole set at once", batch, batch >= 1.3),
        ("merge + load p50 <= 10 ms", "document ids -> adapter loaded in vLLM, cold, ms", ready, ready <= 10),
    ]


def _mode_rows(result: dict, configs: list[str], modes: list[str], section: str, cells, prompt_tokens=False):
    """One table row per mode: ``cells(result[config][section], mode)`` for each config, side by side."""
    rows = []
    for mode in modes:
        row = f"| {mode} |"
        if prompt_tokens:
            row += f" {_get(result['configs'][configs[-1]], section, mode, 'prompt_tokens'):.0f} |"
        rows.append(row + "".join(cells(result["configs"][c][section], mode) for c in configs))
    return rows


def render(result: dict) -> str:
    m = result["meta"]
    configs = [c for c in ("stock", "prag") if c in result["configs"]] or ["no-lora"]
    lines = [f"# Table 4 on vLLM — {result['model']} {result['dtype']}, {m['machine']}, {m['date']}", "",
             f"`{m['command']}`", "",
             f"{result['questions']} questions from `{result['data']}`; {result['retrieved']} retrieved documents "
             f"(top-3 of {result['documents']}); adapters: {result['trained_adapters']} trained, "
             f"{result['synthetic_adapters']} synthetic (random, trained spread). Every answer is "
             f"{result['max_tokens']} tokens (ignore_eos). max_loras {result['max_loras']}.", "",
             "## Per-question latency, one request at a time (the paper's Table 4 shape)", ""]
    head = "| mode | prompt tokens | " + " | ".join(f"{c}: mean s | {c}: p50 s | {c}: p95 s | {c}: vs standard"
                                                   for c in configs) + " |"
    lines += [head, "|---|---:|" + "---:|" * 4 * len(configs)]
    ceiling = result["configs"].get("no-lora", {})
    modes = max((list(result["configs"][c]["latency"]) for c in configs), key=len, default=[])
    lines += _mode_rows(result, configs, modes, "latency", lambda lat, mode: (
        f" {_get(lat, mode, 'mean_s'):.3f} | {_get(lat, mode, 'p50_s'):.3f} | {_get(lat, mode, 'p95_s'):.3f} |"
        f" {_get(lat, 'standard', 'mean_s') / _get(lat, mode, 'mean_s'):.2f}x |"), prompt_tokens=True)
    if ceiling:
        lat = _get(ceiling, "latency", "closed-book")
        lines.append(f"| closed-book, engine without LoRA | {_get(lat, 'prompt_tokens'):.0f} | "
                     f"{_get(lat, 'mean_s'):.3f} | {_get(lat, 'p50_s'):.3f} | {_get(lat, 'p95_s'):.3f} | |")
    lines += ["", "## Batch throughput: all questions at once", "",
              "| mode | " + " | ".join(f"{c}: q/s | {c}: out tok/s | {c}: vs standard" for c in configs) + " |",
              "|---|" + "---:|" * 3 * len(configs)]
    lines += _mode_rows(result, configs, modes, "batch", lambda b, mode: (
        f" {_get(b, mode, 'q_s'):.2f} | {_get(b, mode, 'out_tok_s'):.1f} |"
        f" {_get(b, mode, 'q_s') / _get(b, 'standard', 'q_s'):.2f}x |"))
    if ceiling:
        b = _get(ceiling, "batch", "closed-book")
        lines.append(f"| no-LoRA ceiling (closed-book, engine without LoRA) | {_get(b, 'q_s'):.2f} | "
                     f"{_get(b, 'out_tok_s'):.1f} | |")
    lines += ["", "## Document ids -> adapter ready (merge + write + load into vLLM)", "",
              "| | " + " | ".join(f"{c}: n | {c}: p50 ms | {c}: p95 ms" for c in configs) + " |",
              "|---|" + "---:|" * 3 * len(configs)]
    kinds = max((list(_get(result["configs"][c], "adapter_ready_ms", default={})) for c in configs), key=len,
                default=[])
    for k in kinds:
        row = f"| {k} |"
        for c in configs:
            v = _get(result["configs"][c], "adapter_ready_ms", k, default={})
            row += f" {_get(v, 'n', default=0)} | {_get(v, 'p50'):.2f} | {_get(v, 'p95'):.2f} |"
        lines.append(row)
    lines += ["", "## Targets (ratios from this run)", "", "| target | measured as | " +
              " | ".join(configs) + " |", "|---|---|" + "---:|" * len(configs)]
    per = {c: targets(result, c) for c in configs}
    for i, (name, how, _, _) in enumerate(per[configs[0]] if configs else []):
        lines.append(f"| {name} | {how} | " + " | ".join(
            f"{per[c][i][2]:.2f} {'met' if per[c][i][3] else 'NOT met'}" for c in configs) + " |")
    return "\n".join(lines)
