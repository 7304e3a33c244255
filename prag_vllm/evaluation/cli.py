"""``prag eval`` arguments and handler (registered by :mod:`prag_vllm.cli`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from prag_vllm.cliargs import (
    LazyEngine,
    add_merge_policy_argument,
    add_model_arguments,
    model_path,
    modes,
    positive,
    top_k,
)

__all__ = ["LazyEngine", "add_eval_command", "cmd_eval"]
logger = logging.getLogger(__name__)


def _inits(text: str) -> list[str]:
    from prag_vllm.evaluation.run import INITS

    names = [i.strip() for i in text.split(",") if i.strip()]
    bad = [i for i in names if i not in INITS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown LoRA init {bad or text!r}; choose from {', '.join(INITS)}")
    return list(dict.fromkeys(names))


def _sizes(text: str) -> list[int]:
    """argparse type: one positive count, or one per ``--dataset`` in order (``15,30``)."""
    try:
        return [positive(v) for v in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"counts must be positive: expected N or N,M,... (one per dataset), "
                                         f"got {text!r}") from None


def _one_or_list(values: list[int] | None) -> int | list[int] | None:
    return values[0] if values and len(values) == 1 else values


def _recipes(text: str) -> list[str]:
    """argparse type: one recipe or a comma-separated list (``default,paper``), each once."""
    from prag_vllm.errors import InputError
    from prag_vllm.recipes import RECIPES, get_recipe

    names = [r.strip() for r in text.split(",") if r.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"no recipe in {text!r}; choose from {', '.join(RECIPES)}")
    try:
        return list(dict.fromkeys(get_recipe(r).name for r in names))
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_eval_command(sub) -> None:
    """Add the ``eval`` subcommand to the ``prag`` sub-parsers."""
    from prag_vllm.augment import AugmentConfig
    from prag_vllm.datasets import FORMATS
    from prag_vllm.offline_commands import add_recipe_arguments

    # conflict_handler="resolve": eval's --recipe (a list) replaces the one add_recipe_arguments adds
    sp = sub.add_parser("eval", help="compare the five modes on QA datasets: predictions, metrics, report, plots",
                        conflict_handler="resolve")
    sp.set_defaults(func=cmd_eval)
    sp.add_argument("--dataset", action="append", required=True,
                    help=f"QA file in its native format (repeatable; FORMAT=PATH forces one of {', '.join(FORMATS)})")
    sp.add_argument("--out", required=True, help="output directory (a rerun with the same settings resumes)")
    sp.add_argument("--work-dir", default=None,
                    help="index, augmentations, adapters (default: OUT/work; for long runs "
                         "$PRAG_CACHE_DIR/eval/NAME, outside the checkout, see docs/evaluation.md)")
    sp.add_argument("--corpus", default=None, help="retrieval corpus for all datasets (default: each file's passages)")
    n = sp.add_mutually_exclusive_group()
    n.add_argument("--limit", type=positive, default=None, help="first N questions of each dataset")
    n.add_argument("--per-type", type=_sizes, default=None,
                   help="first N questions of each sub-type; N,M,... gives one count per --dataset, in order")
    sp.add_argument("--mode", type=modes, default=modes("all"), help="comma-separated modes or 'all' (default)")
    sp.add_argument("--top-k", type=top_k, default=3)
    add_merge_policy_argument(sp)
    sp.add_argument("--init", type=_inits, default=["random"], help="LoRA init(s): random, warmup or random,warmup")
    add_recipe_arguments(sp)
    sp.add_argument("--recipe", type=_recipes, default=["default"],
                    help="training recipe(s), e.g. default or default,paper: one adapter set each, sharing the "
                         "index and the augmentations; --loss-policy/--epochs/--lr apply to every one")
    sp.add_argument("--n-rewrites", type=int, default=AugmentConfig.n_rewrites)
    sp.add_argument("--n-qa", type=int, default=AugmentConfig.n_qa)
    sp.add_argument("--warmup-size", type=positive, default=300, help="QA pairs for the warm-up LoRA")
    sp.add_argument("--warmup-epochs", type=positive, default=1)
    sp.add_argument("--warmup-data", default=None, help="QA file for the warm-up pairs (default: non-evaluated questions)")
    sp.add_argument("--batch-size", type=positive, default=64, help="requests per vLLM call when answering")
    sp.add_argument("--max-tokens", type=positive, default=32)
    sp.add_argument("--offline-only", action="store_true",
                    help="only augment and train (resumable chunks); answer in a later run without it")
    add_model_arguments(sp)


def cmd_eval(args) -> int:
    from prag_vllm.augment import AugmentConfig
    from prag_vllm.evaluation.compare import differences_markdown
    from prag_vllm.evaluation.report import score_markdown
    from prag_vllm.evaluation.run import EvalConfig, run_eval, validate
    from prag_vllm.generate import EngineConfig
    from prag_vllm.offline_commands import train_config_from_args

    cfg = EvalConfig(datasets=args.dataset, out_dir=Path(args.out), work_dir=Path(args.work_dir) if args.work_dir else None,
                     corpus=args.corpus, limit=args.limit, per_type=_one_or_list(args.per_type), modes=args.mode,
                     top_k=args.top_k, merge_policy=args.merge_policy,
                     inits=args.init,
                     train=[train_config_from_args(argparse.Namespace(**{**vars(args), "recipe": r}))
                            for r in args.recipe],
                     augment=AugmentConfig(n_rewrites=args.n_rewrites, n_qa=args.n_qa),
                     warmup_size=args.warmup_size, warmup_epochs=args.warmup_epochs, warmup_data=args.warmup_data,
                     batch_size=args.batch_size, max_tokens=args.max_tokens, offline_only=args.offline_only)
    validate(cfg)  # bad input stops here, before a model is fetched or loaded
    engine_cfg = EngineConfig(model=str(model_path(args)), dtype=args.dtype, max_model_len=args.max_model_len)
    with LazyEngine(engine_cfg) as engine:
        metrics = run_eval(cfg, engine)
    if cfg.offline_only:
        print(f"augmentation and training done; timings in {cfg.out_dir / 'timings.json'}")
        return 0
    print(score_markdown(metrics, "f1"))
    if metrics.get("comparisons"):
        print("\n" + differences_markdown(metrics))
    print(f"\nreport: {cfg.out_dir / 'report.md'}")
    return 0
