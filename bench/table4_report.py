"""Markdown tables and target checks for bench/table4.py results."""

from __future__ import annotations

import math
import statistics

NAN = float("nan")


def _get(d: dict, *keys, default=NAN):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def _batch(config: dict, n: int | None) -> dict:
    """The batch step over the first ``n`` questions (all of them when ``n`` is None)."""
    if n is not None and "batch_subset" in config and _get(config, "batch", "closed-book", "n", default=n) != n:
        return config["batch_subset"]
    return config.get("batch", {})


def targets(result: dict, ops: str = "prag", n: int | None = None) -> list[tuple[str, str, float, bool]]:
    """(target, how it is computed, value, met) for the issue's four targets (``n``: the
    ceiling over the first n questions, as the stock server was asked)."""
    c, ceiling = result["configs"].get(ops, {}), result["configs"].get("no-lora", {})
    overhead = _get(c, "batch", "parametric", "out_tok_s") / _get(_batch(ceiling, n), "closed-book", "out_tok_s")
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


def _verdict(value: float, met: bool) -> str:
    """``0.92 met`` / ``24.52 NOT met``; a ratio whose mode was not run is "not measured"."""
    return "not measured" if math.isnan(value) else f"{value:.2f} {'met' if met else 'NOT met'}"


def _mode_table(sections: dict, ceiling: dict, modes: list[str], cells, ratio, ceiling_label: str,
                prompt_tokens: bool = False) -> list[str]:
    """One row per mode of ``sections`` (mode -> measurements): ``cells(m)`` and ``ratio(m, standard)``;
    then the engine-without-LoRA row (closed-book of ``ceiling``), same cells, no ratio."""
    def row(label: str, m: dict, last: str) -> str:
        tokens = f" {_get(m, 'prompt_tokens'):.0f} |" if prompt_tokens else ""
        return f"| {label} |{tokens}{cells(m)}{last}"

    rows = [row(mode, _get(sections, mode, default={}),
                f" {ratio(_get(sections, mode, default={}), _get(sections, 'standard', default={})):.2f}x |")
            for mode in modes]
    if ceiling:
        rows.append(row(ceiling_label, _get(ceiling, "closed-book", default={}), " |"))
    return rows


def render(result: dict) -> str:
    m = result["meta"]
    configs = ["prag"] if "prag" in result["configs"] else ["no-lora"]
    lines = [f"# Table 4 on vLLM — {result['model']} {result['dtype']}, {m['machine']}, {m['date']}", "",
             f"`{m['command']}`", "",
             f"{result['questions']} questions from `{result['data']}`; {result['retrieved']} retrieved documents "
             f"(top-3 of {result['documents']}); adapters: {result['trained_adapters']} trained, "
             f"{result['synthetic_adapters']} synthetic (random, trained spread). Every answer is "
             f"{result['max_tokens']} tokens (ignore_eos). max_loras {result['max_loras']}. vLLM prefix cache: "
             f"{'off' if result.get('prefix_caching') is False else 'on'}. Server: this project's CPU LoRA ops "
             f"(vLLM's stock ops: the comparison below).", "",
             "## Per-question latency, one request at a time (the paper's Table 4 shape)", "",
             *([{"interleaved": "Each question is asked in every mode in turn before the next question.",
                 "by-mode": "All questions in one mode, then the next mode."}[result["order"]], ""]
               if result.get("order") else [])]
    lines += ["| mode | prompt tokens | mean s | p50 s | p95 s | speed-up vs standard |", "|---|---:|---:|---:|---:|---:|"]
    main, ceiling = result["configs"][configs[0]], result["configs"].get("no-lora", {})
    modes = list(main["latency"])
    lines += _mode_table(main["latency"], ceiling.get("latency", {}), modes,
                         lambda m: f" {_get(m, 'mean_s'):.3f} | {_get(m, 'p50_s'):.3f} | {_get(m, 'p95_s'):.3f} |",
                         lambda m, std: _get(std, "mean_s") / _get(m, "mean_s"),
                         "closed-book, engine without LoRA", prompt_tokens=True)
    lines += ["", "## Batch throughput: all questions at once", "",
              "| mode | q/s | out tok/s | vs standard |", "|---|---:|---:|---:|"]
    lines += _mode_table(main["batch"], ceiling.get("batch", {}), modes,
                         lambda m: f" {_get(m, 'q_s'):.2f} | {_get(m, 'out_tok_s'):.1f} |",
                         lambda m, std: _get(m, "q_s") / _get(std, "q_s"),
                         "no-LoRA ceiling (closed-book, engine without LoRA)")
    lines += ["", "## Document ids -> adapter ready (read + merge + write + load into vLLM)", "",
              "| | n | p50 ms | p95 ms |", "|---|---:|---:|---:|"]
    for k, v in _get(main, "adapter_ready_ms", default={}).items():
        lines.append(f"| {k} | {_get(v, 'n', default=0)} | {_get(v, 'p50'):.2f} | {_get(v, 'p95'):.2f} |")
    if "preload_adapters" in result:
        pre = main.get("preload") or {}
        lines += ["", ("Servers started with `--preload-adapters 1`: before the questions, the server validated "
                       f"{pre.get('documents', '?')} document adapters and vLLM's worker read "
                       f"{pre.get('worker_documents', '?')} of them into memory. Cold = a document set never "
                       "merged before.") if result["preload_adapters"] else
                  "Servers started without preloading: a cold adapter also reads its documents' files."]
    lines += _stock_section(result)
    lines += ["", "## Targets (ratios from this run)", "", "| target | measured as | " +
              " | ".join(configs) + " |", "|---|---|" + "---:|" * len(configs)]
    for name, how, value, met in targets(result, configs[0]):
        lines.append(f"| {name} | {how} | {_verdict(value, met)} |")
    return "\n".join(lines)


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else NAN


def _stock_section(result: dict) -> list[str]:
    """vLLM's stock CPU LoRA ops vs this project's, over the questions the stock server was asked."""
    stock, prag = result["configs"].get("stock"), result["configs"].get("prag")
    if not stock or not prag:
        return []
    n = result.get("stock_questions", result["questions"])
    ceiling = result["configs"].get("no-lora", {})
    lines = ["", f"## vLLM's stock CPU LoRA ops vs this project's: the first {n} questions", "",
             "Same questions, same adapters, one server each (the stock one with the zero-adapter guard, "
             "which it needs for correctness).", "",
             "| mode | stock: mean s | this: mean s | speed-up | stock: batch q/s | this: batch q/s | speed-up |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    prag_batch = _batch(prag, n)
    for mode in stock.get("latency", {}):
        s_lat = _get(stock, "latency", mode, "mean_s")
        p_lat = statistics.mean(_get(prag, "latency", mode, "each_s", default=[NAN])[:n])
        s_q, p_q = _get(stock, "batch", mode, "q_s"), _get(prag_batch, mode, "q_s")
        lines.append(f"| {mode} | {s_lat:.3f} | {p_lat:.3f} | {s_lat / p_lat:.2f}x | {s_q:.2f} | {p_q:.2f} | "
                     f"{p_q / s_q:.2f}x |")
    if ceiling:
        lines.append(f"| closed-book, engine without LoRA | | "
                     f"{statistics.mean(_get(ceiling, 'latency', 'closed-book', 'each_s', default=[NAN])[:n]):.3f} |"
                     f" | | {_get(_batch(ceiling, n), 'closed-book', 'q_s'):.2f} | |")
    s_ready = _get(stock, "adapter_ready_ms", "cold", "p50")
    p_ready = _pct(_get(prag, "adapter_ready_ms", "cold", "each", default=[])[:n], 0.5)
    lines += ["", f"Adapter ready, cold p50: stock {s_ready:.1f} ms, this project {p_ready:.1f} ms (the first {n} "
              "cold merges of each).", "", "| target (first questions) | stock | this project |", "|---|---:|---:|"]
    for (name, _, sv, smet), (_, _, pv, pmet) in zip(targets(result, "stock", n), _subset_targets(result, n)):
        lines.append(f"| {name} | {_verdict(sv, smet)} | {_verdict(pv, pmet)} |")
    return lines


def _subset_targets(result: dict, n: int) -> list[tuple[str, str, float, bool]]:
    """This project's targets over the first ``n`` questions only."""
    prag = result["configs"]["prag"]
    sub = {"latency": {k: dict(v, mean_s=statistics.mean(v["each_s"][:n])) for k, v in prag["latency"].items()},
           "batch": _batch(prag, n),
           "adapter_ready_ms": {"cold": {"p50": _pct(_get(prag, "adapter_ready_ms", "cold", "each", default=[])[:n],
                                                     0.5)}}}
    return targets({"configs": {**result["configs"], "prag": sub}}, "prag", n)
