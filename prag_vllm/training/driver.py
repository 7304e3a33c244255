"""A resumable corpus run of the batched trainer: store, progress bar and summary.

Every finished document is written at once to the adapter store, atomically (a
temporary directory renamed into place), so ``kill -9`` at any moment loses at most the
documents in flight: a re-run skips every document whose adapter exists and never shows
a partial one. A document is checked again when it is about to enter a slot, so workers
whose shards overlap (or a re-run racing an old one) do not train it twice.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from prag_vllm.adapters import AdapterStore
from prag_vllm.augment import Augmentation
from prag_vllm.corpus import Document
from prag_vllm.parameterize import TrainConfig, source_digest
from prag_vllm.training.partners import PartnerBank
from prag_vllm.training.trainer import BatchConfig, BatchedTrainer
from prag_vllm.workspace import keyed_store, partner_config, partner_root

logger = logging.getLogger(__name__)

STALE_TEMP_S = 3600.0
"""A store's temporary directory untouched this long is a leftover of a killed writer
(a live one exists for well under a second: one adapter's files)."""


def dir_bytes(path: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def remove_stale_temp_dirs(store: AdapterStore, older_than_s: float = STALE_TEMP_S) -> int:
    """Delete temporary directories that killed writers left in the store; returns how many."""
    docs = store.root / "docs"
    if not docs.is_dir():
        return 0
    now, removed = time.time(), 0
    for p in docs.iterdir():
        if p.name.startswith(".") and p.is_dir() and now - p.stat().st_mtime > older_than_s:
            shutil.rmtree(p, ignore_errors=True)
            removed += 1
    if removed:
        logger.info("removed %d temporary directories left by interrupted runs in %s", removed, docs)
    return removed


def pending(docs: list[Document], augmentations: dict[str, Augmentation],
            store: AdapterStore) -> tuple[list[Document], dict[str, str]]:
    """The documents of ``docs`` without a valid adapter in ``store`` (none, or one trained on
    another text or augmentation), and every document's source digest."""
    digests = {d.id: source_digest(d, augmentations.get(d.id)) for d in docs}
    return [d for d in docs if not store.has(d.id, source=digests[d.id])], digests


def parameterize_batched(docs: list[Document], augmentations: dict[str, Augmentation], store: AdapterStore,
                         model_path: str | os.PathLike, cfg: TrainConfig | None = None,
                         batch: BatchConfig | None = None, trainer: BatchedTrainer | None = None,
                         progress: bool = True) -> dict:
    """Train and store an adapter for every document that has none yet (resumable); returns a summary.
    ``progress``: show a progress bar (off in remote workers: their driver shows one)."""
    from tqdm.auto import tqdm

    remove_stale_temp_dirs(store)
    todo, digests = pending(docs, augmentations, store)
    summary = {"trainer": "batched", "documents": len(docs), "skipped": len(docs) - len(todo), "trained": 0,
               "sequences": 0, "steps": 0, "tokens": 0, "padded_tokens": 0, "seconds": 0.0, "bytes_written": 0}
    if summary["skipped"]:
        logger.info("parameterize: %d of %d documents already have adapters, skipping them",
                    summary["skipped"], len(docs))
    if not todo:
        return summarize(summary)
    cfg = cfg or TrainConfig()
    partners = None
    if cfg.merge_partners and trainer is None:
        root = partner_root(cfg, store)
        if not cfg.partner_adapters:  # the default partner set: every document trained alone first
            logger.info("merge-aware training: the partner set first, %s", root)
            alone = partner_config(cfg)
            parameterize_batched(docs, augmentations, keyed_store(root, alone), model_path, alone, batch,
                                 progress=progress)
        partners = PartnerBank.load(root, docs, augmentations, scaling=cfg.alpha / cfg.rank, seed=cfg.seed)
    trainer = trainer or BatchedTrainer(model_path, cfg, batch, partners=partners)
    raced = []

    def still_todo():
        for d in todo:
            if store.has(d.id, source=digests[d.id]):  # written meanwhile
                raced.append(d.id)
                bar.update(1)
                continue
            yield d, augmentations.get(d.id)

    start = dict(trainer.counters)
    t0 = time.perf_counter()
    bar = tqdm(total=len(todo), desc="parameterize", unit="doc", smoothing=0.05, disable=not progress)

    def on_round(counters: dict) -> None:
        elapsed = time.perf_counter() - t0
        bar.set_postfix(tok_s=f"{(counters['tokens'] - start['tokens']) / max(elapsed, 1e-9):.0f}",
                        rounds=counters["rounds"] - start["rounds"], refresh=False)

    try:
        for done in trainer.train(still_todo(), on_round=on_round):
            path = store.save(done.doc.id, done.adapter)
            summary["trained"] += 1
            summary["sequences"] += done.stats["sequences"]
            summary["steps"] += done.stats["steps"]
            summary["bytes_written"] += dir_bytes(path)
            bar.update(1)
    finally:
        bar.close()
    summary["seconds"] = time.perf_counter() - t0
    summary["tokens"] = trainer.counters["tokens"] - start["tokens"]
    summary["padded_tokens"] = trainer.counters["padded_tokens"] - start["padded_tokens"]
    summary["skipped"] += len(raced)
    return summarize(summary)


def summarize(summary: dict) -> dict:
    """Add the derived rates (documents/hour, tokens/s, padding, bytes/document) to a run summary."""
    s, n = summary.get("seconds", 0.0), summary.get("trained", 0)
    out = dict(summary)
    out["seconds"] = round(s, 2)
    out["documents_per_hour"] = round(n / s * 3600, 1) if s > 0 else None
    out["tokens_per_s"] = round(summary.get("tokens", 0) / s, 1) if s > 0 else None
    if summary.get("padded_tokens"):
        out["padding_fraction"] = round(1 - summary["tokens"] / summary["padded_tokens"], 4)
    out["bytes_per_document"] = round(summary.get("bytes_written", 0) / n) if n else None
    return out
