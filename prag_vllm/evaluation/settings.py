"""The two bookkeeping files of a ``prag eval`` output directory.

``run_config.json``: every setting that changes a finished answer row. A rerun into the
same output directory must match it, except that it may add datasets and recipes (their
rows live in their own logs). Older output directories, from before several recipes could
be evaluated in one run, held one flat ``train`` dict and per-init logs
(``runs/<dataset>/<init>.jsonl``); they are migrated on the first rerun (the logs renamed
to ``<recipe>-<init>.jsonl``, the training timings nested under the recipe).

``timings.json``: seconds and counts per phase, accumulated over resumed runs.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from prag_vllm.errors import InputError
from prag_vllm.fileio import atomic_write_json

logger = logging.getLogger(__name__)
INITS = ("random", "warmup")
"""LoRA initializations (``prag eval --init``)."""


def train_settings(tcfg) -> dict:
    """A recipe's training settings (a :class:`~prag_vllm.parameterize.TrainConfig`) as recorded in
    run_config.json and metrics.json (the warm-up adapter's path is per init, not a setting)."""
    from dataclasses import asdict

    out = {k: v for k, v in asdict(tcfg).items() if k not in ("warmup_adapter", "merge_partners", "partner_adapters")}
    if tcfg.merge_partners:  # added later: recorded only when set, so older runs resume
        from prag_vllm.workspace import partner_key

        out.update(merge_partners=tcfg.merge_partners, partner_adapters=partner_key(tcfg))
    return out


def answer_log(out: Path, dataset: str, recipe: str | None = None, init: str | None = None) -> Path:
    """The resumable answer log of one dataset: ``base.jsonl`` (modes without adapters) or
    ``<recipe>-<init>.jsonl`` (the adapter modes of one recipe and init)."""
    return Path(out) / "runs" / dataset / ("base.jsonl" if recipe is None else f"{recipe}-{init}.jsonl")


def _legacy_recipe(old: dict) -> str | None:
    """The recipe of a run_config.json written before multi-recipe runs (flat ``train``), else None."""
    train = old.get("train")
    if isinstance(train, dict) and "rank" in train:
        return str(train.get("recipe", "default"))
    return None


def _migrate(out_dir: Path, recipe: str) -> None:
    """Rename a single-recipe run's per-init logs and nest its training timings under ``recipe``."""
    runs = out_dir / "runs"
    for ds_dir in sorted(p for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else []:
        for init in INITS:
            src, dst = ds_dir / f"{init}.jsonl", answer_log(out_dir, ds_dir.name, recipe, init)
            if src.is_file() and not dst.exists():
                os.replace(src, dst)
                logger.info("migrated %s -> %s", src, dst.name)
    path = out_dir / "timings.json"
    if path.is_file():
        data = json.loads(path.read_text())
        for node in data.values():
            train = node.get("train") if isinstance(node, dict) else None
            legacy = {k: v for k, v in (train or {}).items() if k in INITS and "docs" in v}
            if legacy:
                for k in legacy:
                    del train[k]
                train.setdefault(recipe, {}).update(legacy)
        atomic_write_json(path, data)


def check_settings(out_dir: Path, settings: dict) -> None:
    """Refuse a rerun whose settings differ from ``out_dir``'s run_config.json; record the union.

    ``settings["datasets"]`` maps dataset name -> file and ``settings["train"]`` recipe name ->
    training settings: a rerun may add datasets or recipes (and may leave some out), but a
    dataset or recipe present in both must match, and so must every other key.
    """
    path = Path(out_dir) / "run_config.json"
    if path.is_file():
        old = json.loads(path.read_text())
        legacy = _legacy_recipe(old)
        old_train = {legacy: old["train"]} if legacy else old.get("train", {})
        old_ds, new_ds, new_train = old.get("datasets", {}), settings["datasets"], settings.get("train", {})
        clash = [k for k in settings if k not in ("datasets", "train") and old.get(k) != settings[k]]
        clash += [f"dataset {n}" for n in new_ds if n in old_ds and old_ds[n] != new_ds[n]]
        clash += [f"recipe {r}'s training settings" for r in new_train if r in old_train and old_train[r] != new_train[r]]
        if clash:
            raise InputError(f"{out_dir} holds a run with other settings ({', '.join(clash)}); "
                             f"use another --out, or the same settings to resume")
        if legacy:
            _migrate(Path(out_dir), legacy)
        settings = dict(settings, datasets={**old_ds, **new_ds}, train={**old_train, **new_train})
        if settings == old:
            return  # a plain resume rewrites nothing
    atomic_write_json(path, settings)


class Timings:
    """Seconds and counts per phase, accumulated over resumed runs in ``timings.json``."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def add(self, keys: list[str], **values: float) -> None:
        node = self.data
        for k in keys:
            node = node.setdefault(k, {})
        for k, v in values.items():
            node[k] = round(node.get(k, 0) + v, 3)
        atomic_write_json(self.path, self.data)
