"""Does a parametric answer change with the batch it runs in? Alone vs together vs shuffled.

An offline engine (``--model``, engine dtype ``--dtype``: ``auto`` = bf16 on a CPU with
AVX512-BF16/AMX) gets ``--adapters`` distinct merge manifests (``--docs`` random rank-2
document adapters each, as the server merges the top-k documents) and as many distinct
questions (greedy, ``--max-tokens`` with ``ignore_eos``: no request leaves a batch early, per-step
top-5 logprobs). For each setting of the CPU
LoRA plugin (``--variants``, set in vLLM's worker between runs):

* ``alone``: each request on its own, in order, then ``alone again`` (reproducible?);
* ``together``: all requests in one batch; ``shuffled``: ``--shuffles`` random orders;
* the same questions closed-book (no adapter) alone and together: the base model's own
  batch dependence, which LoRA ops cannot remove.

Each batched answer is compared with its ``alone`` answer: tokens, the first step that
differs, and the largest difference of a top-5 log-probability over the steps before it
(rounding shows as ~1e-3..1e-1; another request's adapter as a different answer from step
0 and logprobs far apart). Then, for throughput, the variants take turns (``--rounds``) on
the same engine: a batch of the parametric requests (``--decode-tokens``, ignore_eos), one
request alone, and a prefill-heavy batch (``--prompt-words`` of fresh context each round,
1 token).

Variants: ``invariant`` (``PRAG_LORA_BATCH_INVARIANT=1``, the default: LoRA ``rows`` plans and
the base model's one-row products as two rows), ``invariant-lora`` (the LoRA ops only,
``PRAG_ONE_ROW_AS_TWO=0``), ``plans``
(``=0``: each plan kind its own path, the code before), ``plans-f32`` (``=0`` and
``PRAG_LORA_RUNS_F32=1``). Engine-wide settings (``PRAG_STOCK_LORA_OPS=1``, a float32
engine) are separate runs of this script.

    python bench/batch_invariance.py --model qwen2.5-coder-0.5b-instruct --out docs/results/batch_invariance/qwen_bf16

Writes ``OUT.json`` and ``OUT.md``.

``soak``: the 64-client soak of ``tests/test_soak.py`` (the real server on the test model,
mixed modes, every answer compared with the same request sent alone first) in the
production dtype (``--dtype auto``: bf16 on a CPU with native bf16) instead of CI's float32,
reporting mismatches per mode (a benchmark: its pass/fail is reported, not enforced):

    python bench/batch_invariance.py soak --seconds 120 --out docs/results/batch_invariance/soak_bf16
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import run_metadata

QUESTIONS = [
    "Who designed the Tarnholm Bridge?",
    "Where was Velmora Quist born?",
    "What is the title of Quorra Pell's debut album?",
    "In which year was Mount Orvanne first climbed, and by whom?",
    "Which river does the bridge at Ostrevik cross?",
    "What instrument does the cellist from Salt Harbour play?",
    "Name the festival held every spring in Kestrune.",
    "Who was the first mountaineer to reach the summit of the highest peak in the Sevlin range?",
    "When did the glassblowers of Halloway open their first workshop?",
    "Which architect built the lighthouse of Corruptia harbour?",
    "What colour are the tiles fired in the Quillmarsh kilns?",
    "How many bells were cast by the Rewoldia foundries in 1902?",
]

VARIANTS = {
    "invariant": {"PRAG_LORA_BATCH_INVARIANT": "1", "PRAG_LORA_RUNS_F32": None, "PRAG_ONE_ROW_AS_TWO": None},
    "invariant-lora": {"PRAG_LORA_BATCH_INVARIANT": "1", "PRAG_LORA_RUNS_F32": None, "PRAG_ONE_ROW_AS_TWO": "0"},
    "plans": {"PRAG_LORA_BATCH_INVARIANT": "0", "PRAG_LORA_RUNS_F32": None},
    "plans-f32": {"PRAG_LORA_BATCH_INVARIANT": "0", "PRAG_LORA_RUNS_F32": "1"},
}


def build_adapters(model_dir: Path, n: int, docs: int, root: Path, std: float) -> list[Path]:
    """``n`` merge manifests of ``docs`` random rank-2 FFN document adapters each."""
    import torch
    from transformers import AutoConfig

    from prag_vllm.adapters import LoraAdapter
    from prag_vllm.merge import write_merge_manifest

    cfg = AutoConfig.from_pretrained(model_dir)
    out = []
    for i in range(n):
        parts = []
        for j in range(docs):
            ad = LoraAdapter.zeros(cfg, r=2, base_model=str(model_dir))
            g = torch.Generator().manual_seed(1000 * i + j)
            ad.weights = {m: (torch.randn(a.shape, generator=g) * std, torch.randn(b.shape, generator=g) * std)
                          for m, (a, b) in ad.weights.items()}
            ad.alpha, ad.meta = 32.0, {}
            parts.append(LoraAdapter.load(ad.save(root / f"doc{i}-{j}")))
        write_merge_manifest(parts, root / f"merged{i}", [f"doc{i}-{j}" for j in range(docs)])
        out.append(root / f"merged{i}")
    return out


def set_worker_env(engine, env: dict[str, str | None]) -> None:
    """Set the plugin's settings in vLLM's worker process (read there when a step is planned)."""
    def apply(worker, env=env):
        import os

        import vllm.envs as envs

        from prag_vllm.vllm_plugin import punica

        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        punica.runs_in_f32.cache_clear()
        envs.disable_envs_cache()  # vLLM caches its settings after start (VLLM_CPU_ATTN_SPLIT_KV)
        envs.enable_envs_cache()
        return True

    engine.llm.collective_rpc(apply)
    for k, v in env.items():  # and here (an engine without multiprocessing runs the worker in this process)
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def run(engine, convs, adapters, order, max_tokens: int, logprobs: int | None = 5) -> list:
    """Generations of the requests ``order`` in one batch, returned in request-index order."""
    gens = engine.generate([convs[i] for i in order], [adapters[i] for i in order], max_tokens=max_tokens,
                           logprobs=logprobs, guard=False, ignore_eos=True)
    out = [None] * len(convs)
    for i, g in zip(order, gens):
        out[i] = g
    return out


def compare(ref, got) -> dict:
    """Tokens equal?, first differing step, largest |difference| of a log-probability both
    runs list, over the steps up to and including the first differing one."""
    steps = min(len(ref.token_ids), len(got.token_ids))
    first = next((s for s in range(steps) if ref.token_ids[s] != got.token_ids[s]),
                 None if len(ref.token_ids) == len(got.token_ids) else steps)
    upto = steps if first is None else min(first + 1, steps)
    dmax = 0.0
    for s in range(upto):
        a, b = ref.logprobs[s], got.logprobs[s]
        for t in set(a) & set(b):
            dmax = max(dmax, abs(a[t] - b[t]))
    return {"same": ref.token_ids == got.token_ids, "first_diff_step": first, "max_dlogprob": dmax}


def summarize(refs, runs: list[list]) -> dict:
    cmps = [[compare(r, g) for r, g in zip(refs, gens)] for gens in runs]
    changed = sorted({i for c in cmps for i, x in enumerate(c) if not x["same"]})
    return {"changed": len(changed), "of": len(refs), "requests_changed": changed,
            "max_dlogprob": max(x["max_dlogprob"] for c in cmps for x in c),
            "first_diff_steps": sorted({x["first_diff_step"] for c in cmps for x in c
                                        if x["first_diff_step"] is not None})}


def paired(engine, convs, adapters, i: int, max_tokens: int):
    """Request ``i`` with its question closed-book beside it (a step of two rows in vLLM's base
    model, one adapter in the LoRA ops)."""
    return engine.generate([convs[i], convs[i]], [adapters[i], None], max_tokens=max_tokens, logprobs=5,
                           guard=False, ignore_eos=True)[0]


def invariance(engine, convs, adapters, args) -> dict:
    """Strictly alone (twice), alone with a closed-book companion, together, shuffled."""
    n = len(convs)
    idx = list(range(n))
    alone = [run(engine, convs, adapters, [i], args.max_tokens)[i] for i in idx]
    again = [run(engine, convs, adapters, [i], args.max_tokens)[i] for i in idx]
    pair = [paired(engine, convs, adapters, i, args.max_tokens) for i in idx]
    together = run(engine, convs, adapters, idx, args.max_tokens)
    shuffled = []
    for k in range(args.shuffles):
        order = idx[:]
        random.Random(k).shuffle(order)
        shuffled.append(run(engine, convs, adapters, order, args.max_tokens))
    print(f"  alone x2, paired, together, {args.shuffles} shuffled: done", flush=True)
    return {"alone_again": summarize(alone, [again]),
            "together": summarize(alone, [together]), "shuffled": summarize(alone, shuffled),
            "all_batched": summarize(alone, [together, *shuffled]),
            "paired_vs_batched": summarize(pair, [together, *shuffled]),
            "alone_vs_paired": summarize(alone, [pair]),
            "distinct_answers": len({tuple(g.token_ids) for g in alone}),
            "answers": [g.text for g in alone]}


def throughput(engine, convs, adapters, variants: list[str], args, splits: list[str] | None = None) -> dict:
    """The variants take turns on the same engine (the order alternates by round); median per
    workload: a batch of all requests (``--decode-tokens`` each, end to end), one request alone,
    one request alone after a long fresh prompt (``--prompt-words``: decode over a long context,
    where split-KV attention spreads one sequence over the threads), and a batch of long fresh
    prompts (1 token: prefill). ``splits``: several ``VLLM_CPU_ATTN_SPLIT_KV`` values take turns
    too (each variant named ``VARIANT, VLLM_CPU_ATTN_SPLIT_KV=S``)."""
    words = "the of harbour bridge river festival glass tile bell summit album town spring kiln".split()
    combos = [(v, None) for v in variants] if not splits or len(splits) < 2 else \
        [(v, s) for s in splits for v in variants]
    names = [v if s is None else f"{v}, VLLM_CPU_ATTN_SPLIT_KV={s}" for v, s in combos]
    times: dict[str, dict[str, list[float]]] = {
        v: {"batch_decode": [], "single_decode": [], "single_long_decode": [], "prefill": []} for v in names}
    tokens: dict[str, list[int]] = {v: [] for v in names}
    n = len(convs)

    def context(rng, c):
        return [{"role": "user", "content": " ".join(rng.choice(words) for _ in range(args.prompt_words))
                 + "\n" + c[0]["content"]}]

    for r in range(args.rounds):
        for (lora, split), v in (list(zip(combos, names)) if r % 2 == 0 else list(zip(combos, names))[::-1]):
            set_worker_env(engine, VARIANTS[lora] if split is None else {**VARIANTS[lora],
                                                                         "VLLM_CPU_ATTN_SPLIT_KV": split})
            t0 = time.perf_counter()
            engine.generate(convs, adapters, max_tokens=args.decode_tokens, ignore_eos=True, guard=False)
            times[v]["batch_decode"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            engine.generate(convs[:1], adapters[:1], max_tokens=args.decode_tokens, ignore_eos=True, guard=False)
            times[v]["single_decode"].append(time.perf_counter() - t0)
            rng = random.Random(f"{r}-{v}")  # fresh context: no prefix-cache hits
            one = [context(rng, convs[0])]
            engine.generate(one, adapters[:1], max_tokens=1, guard=False)  # into the prefix cache
            t0 = time.perf_counter()  # the cached prompt's last block + 1 token; then + decode_tokens more
            engine.generate(one, adapters[:1], max_tokens=1, guard=False)
            t1 = time.perf_counter()
            engine.generate(one, adapters[:1], max_tokens=args.decode_tokens + 1, ignore_eos=True, guard=False)
            times[v]["single_long_decode"].append(max(time.perf_counter() - t1 - (t1 - t0), 1e-6))
            long = [context(rng, c) for c in convs]
            t0 = time.perf_counter()
            gens = engine.generate(long, adapters, max_tokens=1, guard=False)
            times[v]["prefill"].append(time.perf_counter() - t0)
            tokens[v].append(sum(g.prompt_tokens for g in gens))
    out = {}
    for v in names:
        med = {k: statistics.median(x) for k, x in times[v].items()}
        out[v] = {"batch_decode_tok_s": n * args.decode_tokens / med["batch_decode"],
                  "single_decode_tok_s": args.decode_tokens / med["single_decode"],
                  "single_long_decode_tok_s": args.decode_tokens / med["single_long_decode"],
                  "prefill_tok_s": statistics.median(t / x for t, x in zip(tokens[v], times[v]["prefill"])),
                  "seconds": {k: [round(t, 3) for t in x] for k, x in times[v].items()}}
    out["prefill_prompt_tokens"] = round(statistics.mean(t for v in names for t in tokens[v]))
    out["order"] = names
    return out


def _row(label: str, mode: str, res: dict) -> str:
    def f(key):
        return f"{res[key]['changed']}/{res[key]['of']}"
    return (f"| {label} | {mode} | {f('alone_again')} | {f('together')} | {f('shuffled')} | "
            f"{res['all_batched']['max_dlogprob']:.2e} | {f('alone_vs_paired')} | {f('paired_vs_batched')} | "
            f"{res['paired_vs_batched']['max_dlogprob']:.2e} |")


def markdown(report: dict) -> str:
    lines = [f"# Batch invariance: {report['model']} ({report['dtype']})", "",
             f"{report['machine']}; {report['date']}; `{report['command']}`", "",
             f"{report['adapters']} merged adapters (rank {2 * report['docs']}), {report['adapters']} distinct "
             f"questions, greedy, {report['max_tokens']} tokens; {report['shuffles']} shuffled orders; engine start "
             f"{report['engine_start_s']:.0f} s; prefix caching {report['prefix_caching']} (block "
             f"{report['block_size']}).", ""]
    if report["closed_book"]:
        lines += [
             "Answers changed (tokens) of all requests. *alone*: each request on its own (steps of one row in vLLM's "
             "base model); *paired*: alone with its question closed-book beside it (steps of two rows: what the LoRA "
             "ops alone decide). Δlogprob: the largest difference of a top-5 log-probability up to the first "
             "differing token.", "",
             "| LoRA ops | mode | alone again | together vs alone | shuffled vs alone | max Δlogprob | alone vs paired "
             "| together+shuffled vs paired | max Δlogprob vs paired |",
             "|---|---|---|---|---|---|---|---|---|"]
    for split, res in report["closed_book"].items():
        lines.append(_row(f"(base model), {split}", "closed-book", res))
    for key, res in report["parametric"].items():
        lines.append(_row(key, "parametric", res))
    if report.get("throughput"):
        tp = report["throughput"]
        lines += ["", f"Throughput, LoRA ops taking turns on one engine ({report['rounds']} rounds, median; "
                  f"VLLM_CPU_ATTN_SPLIT_KV={tp['attn_split_kv']}; prefill: {tp['prefill_prompt_tokens']} prompt "
                  "tokens in one batch, 1 output token; long-context single decode: one request after "
                  f"~{tp['prefill_prompt_tokens'] // report['adapters']} prompt tokens):", "",
                  "| LoRA ops | batch decode tok/s | single request decode tok/s | long-context single decode tok/s "
                  "| prefill tok/s |", "|---|---|---|---|---|"]
        for v in tp.get("order", [v for v in report["variants"] if v in tp]):
            t = tp[v]
            long = f"{t['single_long_decode_tok_s']:.2f}" if "single_long_decode_tok_s" in t else "-"
            lines.append(f"| {v} | {t['batch_decode_tok_s']:.1f} | {t['single_decode_tok_s']:.2f} | {long} | "
                         f"{t['prefill_tok_s']:.0f} |")
    return "\n".join(lines) + "\n"


def soak(argv: list[str]) -> None:
    """``tests/test_soak.py`` with the server in ``--dtype``; its report (with mismatches per
    mode) to ``OUT.json`` and a table to ``OUT.md``."""
    import subprocess

    from prag_vllm.generate import resolve_dtype

    ap = argparse.ArgumentParser(prog="batch_invariance.py soak")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--out", default="runs/bench/soak")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PRAG_TEST_SERVER_DTYPE=args.dtype, PRAG_SOAK_SECONDS=str(args.seconds),
               PRAG_SOAK_REPORT=str(out.with_suffix(".json").resolve()))
    root = Path(__file__).resolve().parents[1]
    t0 = time.perf_counter()
    rc = subprocess.call([sys.executable, "-m", "pytest", "-s", "-p", "no:cacheprovider", "tests/test_soak.py"],
                         cwd=root, env=env)
    report = {**run_metadata(), "engine_dtype": resolve_dtype(args.dtype), "pytest_exit_code": rc,
              "wall_s": time.perf_counter() - t0,
              "batch_invariant": os.environ.get("PRAG_LORA_BATCH_INVARIANT", "1"),
              **json.loads(out.with_suffix(".json").read_text())}
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Soak in the production dtype: test model, {report['engine_dtype']}", "",
             f"{report['machine']}; {report['date']}; `{report['command']}`", "",
             f"{report['clients']} clients for {report['seconds']:.0f} s, {report['requests']} requests "
             f"({report['requests_per_s']:.2f}/s), {report['distinct_jobs']} distinct jobs, "
             f"{report['distinct_adapter_sets']} adapter sets; errors {report['errors']}; "
             f"PRAG_LORA_BATCH_INVARIANT={report['batch_invariant']}; tests/test_soak.py exit code {rc}.", "",
             "*vs alone*: each answer under load compared with the same request sent alone before the "
             "soak; *varied under load*: jobs answered twice or more under load whose answers differed among "
             "themselves.", "",
             "| mode | requests | mismatches vs alone | distinct jobs | jobs that mismatched vs alone "
             "| jobs answered twice+ under load | of those, varied under load |", "|---|---|---|---|---|---|---|"]
    for m, v in report["by_mode"].items():
        varied = len(v["jobs_answers_varied"]) if "jobs_answers_varied" in v else "-"
        lines.append(f"| {m} | {v['requests']} | {v['mismatches']} | {v['distinct_jobs']} | {len(v['jobs_mismatched'])} "
                     f"| {v.get('jobs_answered_twice', '-')} | {varied} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    if sys.argv[1:2] == ["soak"]:
        return soak(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--docs", type=int, default=3)
    ap.add_argument("--std", type=float, default=0.05)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--shuffles", type=int, default=2)
    ap.add_argument("--variants", default="plans,invariant,plans-f32")
    ap.add_argument("--rounds", type=int, default=3, help="throughput rounds (0: none)")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--prompt-words", type=int, default=300)
    ap.add_argument("--attn-split-kv", default="1,0",
                    help="VLLM_CPU_ATTN_SPLIT_KV values to check (vLLM's default: 1; empty: no invariance check)")
    ap.add_argument("--throughput-split-kv", default=None,
                    help="VLLM_CPU_ATTN_SPLIT_KV values for the throughput turns (default: the first of "
                         "--attn-split-kv, else 1); several: they take turns too (its cost measured side by side)")
    ap.add_argument("--out", default="runs/bench/batch_invariance")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # set_worker_env's RPC

    from prag_vllm.generate import EngineConfig, VLLMEngine, resolve_dtype
    from prag_vllm.models import resolve_model
    from prag_vllm.modes import question_prompt

    variants = args.variants.split(",")
    model_dir = resolve_model(args.model)
    if args.adapters > len(QUESTIONS):
        sys.exit(f"at most {len(QUESTIONS)} adapters")
    convs = [[{"role": "user", "content": question_prompt(q)}] for q in QUESTIONS[:args.adapters]]
    report = {**run_metadata(), "model": args.model, "dtype": resolve_dtype(args.dtype), "adapters": args.adapters,
              "docs": args.docs, "max_tokens": args.max_tokens, "shuffles": args.shuffles, "variants": variants,
              "rounds": args.rounds, "stock_ops": os.environ.get("PRAG_STOCK_LORA_OPS", "0")}
    with tempfile.TemporaryDirectory(prefix="prag-bi-") as tmp:
        adapters = build_adapters(model_dir, args.adapters, args.docs, Path(tmp), args.std)
        t0 = time.perf_counter()
        with VLLMEngine(EngineConfig(model=str(model_dir), dtype=args.dtype, max_model_len=2048,
                                     max_loras=max(8, args.adapters), max_num_seqs=32)) as engine:
            report["engine_start_s"] = time.perf_counter() - t0
            cfg = engine.llm.llm_engine.vllm_config.cache_config
            report["block_size"], report["prefix_caching"] = cfg.block_size, cfg.enable_prefix_caching
            none = [None] * len(convs)
            print(f"engine ready in {report['engine_start_s']:.0f} s", flush=True)
            report["closed_book"], report["parametric"] = {}, {}
            keys = ("alone_again", "together", "shuffled", "alone_vs_paired", "paired_vs_batched")
            for split in [s for s in args.attn_split_kv.split(",") if s]:
                label = f"VLLM_CPU_ATTN_SPLIT_KV={split}"
                set_worker_env(engine, {"VLLM_CPU_ATTN_SPLIT_KV": split})
                for v in [v for v in variants if v in ("invariant", "invariant-lora")] or [None]:
                    if v is not None:  # the base model's one-row products depend on the variant
                        set_worker_env(engine, VARIANTS[v])
                    key = label if v is None else f"{v}, {label}"
                    res = report["closed_book"][key] = invariance(engine, convs, none, args)
                    print("closed-book", key, json.dumps({k: res[k] for k in keys}), flush=True)
                for v in variants:
                    if v == "plans-f32" and split != args.attn_split_kv.split(",")[-1]:
                        continue  # once is enough
                    set_worker_env(engine, VARIANTS[v])
                    res = report["parametric"][f"{v}, {label}"] = invariance(engine, convs, adapters, args)
                    print(v, label, json.dumps({k: res[k] for k in keys}), flush=True)
            if args.rounds:
                splits = (args.throughput_split_kv or args.attn_split_kv.split(",")[0] or "1").split(",")
                set_worker_env(engine, {"VLLM_CPU_ATTN_SPLIT_KV": splits[0]})
                report["throughput"] = throughput(engine, convs, adapters, [v for v in variants if v != "plans-f32"],
                                                  args, splits)
                report["throughput"]["attn_split_kv"] = ",".join(splits)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
