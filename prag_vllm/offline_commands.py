"""``prag augment`` and ``prag parameterize``: arguments and handlers (registered by cli.py).

Both take ``--shard i/N`` (:mod:`prag_vllm.sharding`): N workers split the corpus by a
hash of the document id with no coordination. A sharded ``augment`` writes its own log,
``augmented.shard-i-of-N.jsonl``, so shards can share a workspace; ``parameterize``
reads the workspace's ``augmented.jsonl`` and every shard log. ``parameterize`` trains
with the batched trainer by default (``--trainer per-doc``: the PEFT one-document
reference).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path

from prag_vllm.cliargs import count, non_negative, positive
from prag_vllm.errors import InputError

logger = logging.getLogger(__name__)

SHARD_LOG_GLOB = "augmented.shard-*-of-*.jsonl"


def _shard(text: str):
    from prag_vllm.sharding import Shard

    try:
        return Shard.parse(text)
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {value}")
    return value


def add_shard_argument(sp: argparse.ArgumentParser) -> None:
    from prag_vllm.sharding import Shard

    sp.add_argument("--shard", type=_shard, default=Shard(), metavar="i/N",
                    help="only the documents of shard i of N (hash of the id; run N workers with 0/N .. N-1/N)")


def _recipe(text: str) -> str:
    from prag_vllm.recipes import get_recipe

    try:
        return get_recipe(text).name
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _loss_policy(text: str) -> str:
    from prag_vllm.sequences import check_loss_policy

    try:
        return check_loss_policy(text)
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_recipe_arguments(sp: argparse.ArgumentParser) -> None:
    """``--recipe``, ``--loss-policy``, ``--epochs``, ``--lr`` (the last three default to the recipe's)."""
    from prag_vllm.recipes import RECIPES

    sp.add_argument("--recipe", type=_recipe, default="default",
                    help=f"training recipe: {', '.join(RECIPES)} (default: default; docs/recipes.md)")
    sp.add_argument("--loss-policy", type=_loss_policy, default=None,
                    help="full, content or answer: which tokens carry loss (default: the recipe's)")
    sp.add_argument("--epochs", type=positive, default=None, help="default: the recipe's")
    sp.add_argument("--lr", type=non_negative, default=None, help="default: the recipe's (3e-4)")
    sp.add_argument("--merge-partners", type=count, default=0, metavar="N",
                    help="merge-aware training (experimental: measured worse, docs/recipes.md): each step merges "
                         "N other documents' adapters (trained alone first, frozen) into the document's own, as "
                         "top-(N+1) answering does (batched trainer). Default 0: off")


def train_config_from_args(args, **extra):
    """The :class:`~prag_vllm.parameterize.TrainConfig` of the recipe flags."""
    from prag_vllm.parameterize import TrainConfig

    return TrainConfig(recipe=args.recipe, loss_policy=args.loss_policy, epochs=args.epochs, lr=args.lr,
                       merge_partners=getattr(args, "merge_partners", 0), **extra)


def add_parameterize_arguments(sp: argparse.ArgumentParser) -> None:
    """The trainer's flags (``--epochs``, ``--lr`` and the others are added by cli.py)."""
    from prag_vllm.parameterize import TrainConfig
    from prag_vllm.training.trainer import BatchConfig

    sp.add_argument("--trainer", choices=["batched", "per-doc"], default="batched",
                    help="batched: many documents per pass (default); per-doc: PEFT, one at a time (reference)")
    sp.add_argument("--precision", choices=["bf16-mixed", "float32"], default=TrainConfig.precision)
    sp.add_argument("--slots", type=int, default=BatchConfig.slots, help="documents trained together (batched)")
    sp.add_argument("--max-batch-tokens", type=int, default=BatchConfig.max_batch_tokens,
                    help="tokens per micro-batch (batched)")
    sp.add_argument("--max-padding", type=_fraction, default=BatchConfig.max_padding,
                    help="padding fraction allowed in a micro-batch; 0 = equal lengths only, exact (batched)")
    add_shard_argument(sp)


def augmentation_log(ws, shard) -> Path:
    """Where ``prag augment`` writes: the workspace log, or the shard's own log."""
    return ws.augmented if shard.whole else ws.root / f"augmented.{shard.tag}.jsonl"


def load_workspace_augmentations(ws) -> dict:
    """The workspace's augmentations: ``augmented.jsonl`` plus every shard's log."""
    from prag_vllm.augment import load_augmentations

    out = {}
    for path in [ws.augmented, *sorted(ws.root.glob(SHARD_LOG_GLOB))]:
        out.update(load_augmentations(path))
    return out


def run_augment(args, engine_factory) -> int:
    from prag_vllm.augment import AugmentConfig, augment_corpus, load_augmentations
    from prag_vllm.corpus import load_corpus

    docs = args.shard.select(load_corpus(args.corpus)[: args.limit])
    cfg = AugmentConfig(n_rewrites=args.n_rewrites, n_qa=args.n_qa, batch_size=args.batch_size)
    out = augmentation_log(args.ws, args.shard)
    done = load_augmentations(out)
    if any(d.id not in done for d in docs):  # start an engine only if there is work left
        with engine_factory() as engine:
            done = augment_corpus(docs, engine, out, cfg)
    failed = sum(done[d.id].qa_failed for d in docs)
    print(f"augmented {len(docs)} documents{'' if args.shard.whole else f' (shard {args.shard})'} into {out} "
          f"({failed} without QA pairs)")
    return 0


@contextmanager
def executor_engine(executor, engine_cfg):
    """A started engine of ``executor`` (an :class:`~prag_vllm.executors.ExecutorConfig`): one
    in this process, or a pool of Ray actors; closed, with the executor, on exit."""
    from prag_vllm.executors import get_executor

    with get_executor(executor) as ex, ex.engine(engine_cfg) as engine:
        yield engine


def run_parameterize(args, model_path) -> int:
    from prag_vllm.corpus import load_corpus
    from prag_vllm.executors import executor_config_from_args, get_executor
    from prag_vllm.parameterize import parameterize_corpus
    from prag_vllm.training.driver import dir_bytes, summarize
    from prag_vllm.training.trainer import BatchConfig

    executor = executor_config_from_args(args)
    if args.merge_partners and args.trainer != "batched":
        raise InputError("--merge-partners runs in the batched trainer; leave out --trainer per-doc")
    if executor.kind != "local" and args.merge_partners:
        raise InputError(f"--merge-partners trains on the local executor; leave out --executor {executor.kind}")
    if executor.kind != "local" and args.trainer != "batched":
        raise InputError(f"--executor {executor.kind} runs the batched trainer; leave out --trainer {args.trainer}")
    docs = args.shard.select(load_corpus(args.corpus)[: args.limit])
    augs = load_workspace_augmentations(args.ws)
    missing = [d.id for d in docs if d.id not in augs]
    if missing and not args.no_augmentation:
        raise InputError(f"{len(missing)} documents have no augmentation in {args.ws.root} "
                         f"(run `prag augment` first, or pass --no-augmentation)")
    cfg = train_config_from_args(args, batch_size=args.train_batch_size, warmup_adapter=args.warmup_adapter,
                                 precision=args.precision)
    batch = BatchConfig(slots=args.slots, max_batch_tokens=args.max_batch_tokens, max_padding=args.max_padding)
    if batch.slots < 1 or batch.max_batch_tokens < 1:
        raise InputError("--slots and --max-batch-tokens must be positive")
    store = args.ws.store(model_path(), cfg)
    if args.trainer == "batched":
        with get_executor(executor) as ex:
            summary = ex.parameterize(docs, augs, store, args.model_path, cfg, batch)
    else:
        fresh = [d.id for d in docs if not store.has(d.id)]
        t0 = time.perf_counter()
        summary = dict(parameterize_corpus(docs, augs, store, args.model_path, cfg), trainer="per-doc")
        summary["seconds"] = time.perf_counter() - t0
        summary["bytes_written"] = sum(dir_bytes(store.path(d)) for d in fresh if store.has(d))
        summary = summarize(summary)
    summary["shard"] = str(args.shard)
    summary["store"] = str(store.root)
    logger.info("parameterized %d documents (%d already done) in %.0f s: %s documents/hour, %s tokens/s, "
                "%s bytes per document", summary["trained"], summary["skipped"], summary["seconds"],
                summary["documents_per_hour"], summary["tokens_per_s"], summary["bytes_per_document"])
    print(json.dumps(summary))
    return 0
