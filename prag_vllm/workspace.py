"""Where a run keeps its artefacts: index, augmentations, adapters and answers."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from prag_vllm.adapters import WEIGHTS_FILE, AdapterStore, sha256_file
from prag_vllm.augment import PROMPT_VERSION
from prag_vllm.errors import AdapterError, InputError
from prag_vllm.fileio import atomic_write_json

if TYPE_CHECKING:
    from prag_vllm.parameterize import TrainConfig

logger = logging.getLogger(__name__)
TRAIN_CONFIG_FILE = "train_config.json"


def training_settings(cfg: TrainConfig) -> dict:
    """The training settings that change a document's adapter (the warm-up init by content)."""
    init = "random"
    if cfg.warmup_adapter:
        weights = Path(cfg.warmup_adapter) / WEIGHTS_FILE
        if not weights.is_file():
            raise AdapterError(f"warm-up adapter not found: {weights}")
        init = "warmup:" + sha256_file(weights)[:16]
    settings = {"recipe": cfg.recipe, "loss_policy": cfg.loss_policy, "rank": cfg.rank, "alpha": cfg.alpha,
                "lr": cfg.lr, "epochs": cfg.epochs, "batch_size": cfg.batch_size, "max_length": cfg.max_length,
                "seed": cfg.seed, "precision": cfg.precision, "init": init, "augment_prompt": PROMPT_VERSION}
    if cfg.spec.distill:
        settings["distill_top_k"] = cfg.distill_top_k
    if cfg.merge_partners:  # the partner set by its key (directory name), not by where it lies
        settings.update(merge_partners=cfg.merge_partners, partners=partner_key(cfg))
    return settings


def partner_config(cfg: TrainConfig) -> TrainConfig:
    """The settings of a merge-aware set's partner set by default: ``cfg`` trained alone."""
    from dataclasses import replace

    return replace(cfg, merge_partners=0, partner_adapters=None)


def partner_key(cfg: TrainConfig) -> str:
    """The partner set's directory name (its training key): what a merge-aware set's key records of it."""
    return Path(cfg.partner_adapters).name if cfg.partner_adapters else training_key(partner_config(cfg))


def partner_root(cfg: TrainConfig, store: AdapterStore) -> Path:
    """Where ``cfg``'s partner adapters are: ``cfg.partner_adapters``, or the set of
    :func:`partner_config` beside ``store`` (a workspace keeps its sets side by side)."""
    return Path(cfg.partner_adapters) if cfg.partner_adapters else store.root.parent / partner_key(cfg)


def training_key(cfg: TrainConfig) -> str:
    """Directory name of an adapter set: readable prefix (recipe, rank, epochs, init) + short hash of
    :func:`training_settings` -- two recipes, or two settings of one, never share adapters."""
    settings = training_settings(cfg)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    merged = f"-m{cfg.merge_partners}" if cfg.merge_partners else ""
    return f"{cfg.recipe}-r{cfg.rank}-e{cfg.epochs}-{settings['init'].split(':')[0]}{merged}-{digest}"


def keyed_store(root: Path, cfg: TrainConfig) -> AdapterStore:
    """The adapter set at ``root``, trained under ``cfg``: its ``train_config.json`` is written
    on first use (the settings, for ``Workspace.store`` to find the set by)."""
    if not (root / TRAIN_CONFIG_FILE).is_file():
        try:
            atomic_write_json(root / TRAIN_CONFIG_FILE, training_settings(cfg))
        except OSError as exc:
            raise InputError(f"the adapter store {root} is not writable here: {exc.strerror or exc}") from None
    return AdapterStore(root)


@dataclass(frozen=True)
class Workspace:
    """A directory holding everything one corpus produces (safe to resume into)."""

    root: Path
    """Workspace directory (created on demand)."""

    @classmethod
    def at(cls, path: str | os.PathLike) -> Workspace:
        return cls(Path(path).expanduser())

    @property
    def index_dir(self) -> Path:
        return self.root / "index"

    @property
    def augmented(self) -> Path:
        return self.root / "augmented.jsonl"

    def store(self, model_path: str | os.PathLike, cfg: TrainConfig | None = None) -> AdapterStore:
        """Adapters are per base model and training settings: ``adapters/<model>/<training_key(cfg)>/``.

        With ``cfg`` None (answering, merging) the model's only adapter set is used; if it has
        several, the one of the default :class:`TrainConfig` (a warning names the others).
        """
        from prag_vllm.parameterize import TrainConfig

        base = self.root / "adapters" / Path(model_path).name
        if cfg is None:
            sets = sorted(p.parent for p in base.glob(f"*/{TRAIN_CONFIG_FILE}"))
            if len(sets) == 1:
                return AdapterStore(sets[0])
            if not sets and (base / "docs").is_dir():  # layout before adapter sets were keyed
                return AdapterStore(base)
            default = base / training_key(TrainConfig())
            if sets:
                logger.warning("adapter sets in %s: %s; using the default training settings' (%s)",
                               base, ", ".join(p.name for p in sets), default.name)
            return AdapterStore(default)
        return keyed_store(base / training_key(cfg), cfg)
