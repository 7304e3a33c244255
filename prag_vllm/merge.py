"""Update: merge the top-k per-document LoRAs into ONE exact LoRA of rank Σ r_j.

For documents j = 1..k with factors A_j ``[r_j, in]``, B_j ``[out, r_j]`` and scaling
s_j = alpha_j / r_j, the merged adapter is

    A = [A_1; ...; A_k]            (rows concatenated,   [Σr_j, in])
    B = [c_1 B_1, ..., c_k B_k]    (columns concatenated, [out, Σr_j]),  c_j = s_j / s

with merged scaling s = alpha / Σr_j, so that s · B A = Σ_j s_j B_j A_j exactly. When
all documents share one scaling (the normal case) alpha is chosen so that s = s_j and
every c_j = 1: no tensor is rescaled and the merge is exact in any dtype.

``fold_scaling=True`` writes B = [s_1 B_1, ..., s_k B_k] with alpha = Σr_j (s = 1)
instead. The product is the same; vLLM, which multiplies B by s itself each time it loads
an adapter (about 4 ms of a ~24 ms load for Qwen2.5-0.5B), then skips that step. With the
usual s_j = 16 (a power of two) the folded B is bit-exact in bf16 as well.

A merge can also be handed to vLLM as a *manifest* (:func:`write_merge_manifest`): a
PEFT directory whose ``adapter_config.json`` describes the merged adapter and whose
``prag_merge.json`` lists the document adapters' tensor files (path, sha256, identity of
the file when the server validated it) instead of holding merged tensors. This project's
vLLM plugin (:mod:`prag_vllm.vllm_plugin.merged`) puts the same merged adapter into
vLLM's LoRA slot, copying each document's factors from memory: nothing is concatenated,
written or parsed again. :func:`merge_from_manifest` builds that adapter as tensors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from prag_vllm.adapters import CONFIG_FILE, AdapterStore, LoraAdapter, WeightsSource
from prag_vllm.errors import AdapterError, InputError
from prag_vllm.fileio import atomic_directory

MANIFEST_FILE = "prag_merge.json"
MANIFEST_FORMAT = "prag-merge/1"

logger = logging.getLogger(__name__)


def check_mergeable(adapters: list[LoraAdapter]) -> list[str]:
    """The modules ``adapters`` all target; :class:`AdapterError` if they cannot be merged."""
    if not adapters:
        raise AdapterError("nothing to merge: no adapters given")
    modules = list(adapters[0].weights)
    for ad in adapters[1:]:
        if set(ad.weights) != set(modules):
            raise AdapterError("cannot merge adapters that target different modules")
    if len({ad.base_model for ad in adapters}) > 1:
        raise AdapterError(f"cannot merge adapters of different base models: {sorted({a.base_model for a in adapters})}")
    return modules


def folded(adapter: LoraAdapter, scaling: float = 1.0) -> LoraAdapter:
    """The same update written with scaling ``scaling``: B multiplied by ``s / scaling``
    (in float32, rounded to B's dtype once) and ``alpha = scaling * r``. A merge of folded
    adapters is :func:`merge_adapters` of the originals, bit for bit."""
    c = adapter.scaling / scaling
    if c == 1.0:
        return adapter
    weights = {m: (a, (b.float() * c).to(b.dtype)) for m, (a, b) in adapter.weights.items()}
    return LoraAdapter(r=adapter.r, alpha=scaling * adapter.r, weights=weights, base_model=adapter.base_model,
                       target_modules=adapter.target_modules, meta=adapter.meta, source=adapter.source)


MERGE_POLICIES = ("sum", "mean")
"""How the top-k documents' updates combine. ``sum``: ΔW = Σ_j ΔW_j (PRAG).
``mean``: ΔW = (1/k) Σ_j ΔW_j, each document's update weighted 1/k by its alpha (the factors
are untouched, so the merge stays exact in any dtype); docs/recipes.md measures both."""

DEFAULT_MERGE_POLICY = "mean"
"""What answering (``prag answer``/``eval``/``demo``, the server) uses unless told: measured
better than ``sum`` on the invented benchmark and on Table 1 (docs/recipes.md). The functions
of this module default to ``sum``, the plain exact merge."""


def check_merge_policy(name: object) -> str:
    if name not in MERGE_POLICIES:
        raise InputError(f"unknown merge policy {name!r}; choose from {', '.join(MERGE_POLICIES)}")
    return name


def weighted(adapters: list[LoraAdapter], policy: str = "sum") -> list[LoraAdapter]:
    """``adapters`` as the merge ``policy`` weights them: for ``mean`` each alpha (so each update)
    times 1/k; for ``sum``, or a single adapter, the adapters themselves."""
    if check_merge_policy(policy) == "sum" or len(adapters) < 2:
        return adapters
    return [replace(ad, alpha=ad.alpha / len(adapters)) for ad in adapters]


def merge_adapters(adapters: list[LoraAdapter], *, fold_scaling: bool = False, policy: str = "sum") -> LoraAdapter:
    """Concatenate ``adapters`` into one LoRA whose ΔW is the sum of theirs (``fold_scaling``:
    the scalings multiplied into B, and the merged scaling 1); ``policy="mean"``: their mean."""
    import torch

    adapters = weighted(adapters, policy)
    modules = check_mergeable(adapters)
    rank = sum(ad.r for ad in adapters)
    scalings = {ad.scaling for ad in adapters}
    scaling = 1.0 if fold_scaling or len(scalings) > 1 else scalings.pop()
    parts = [folded(ad, scaling) for ad in adapters]  # B of each rescaled by c_j = s_j / s (none when 1)
    merged = {m: (torch.cat([ad.weights[m][0] for ad in parts], dim=0),
                  torch.cat([ad.weights[m][1] for ad in parts], dim=1)) for m in modules}
    return LoraAdapter(r=rank, alpha=scaling * rank, weights=merged, base_model=adapters[0].base_model,
                       target_modules=adapters[0].target_modules,
                       meta={"kind": "merged", **({"policy": policy} if policy != "sum" else {})})


def write_merge_manifest(adapters: list[LoraAdapter], directory: str | os.PathLike, doc_ids: list[str]) -> int:
    """Write the merge of ``adapters`` (each read from a file: ``adapter.source`` set) as a
    manifest directory, atomically; returns its size in bytes. The merged adapter it
    describes is ``merge_adapters(adapters, fold_scaling=True)``."""
    if not adapters:
        raise AdapterError("nothing to merge: no adapters given")
    if any(ad.source is None for ad in adapters):
        raise AdapterError("a merge manifest needs adapters read from files (LoraAdapter.load)")
    rank = sum(ad.r for ad in adapters)
    config = LoraAdapter(r=rank, alpha=float(rank), weights={}, base_model=adapters[0].base_model,
                         target_modules=adapters[0].target_modules).peft_config()
    manifest = {"format": MANIFEST_FORMAT, "doc_ids": list(doc_ids), "r": rank,
                "parts": [{"path": ad.source.path, "sha256": ad.source.sha256, "size": ad.source.size,
                           "mtime_ns": ad.source.mtime_ns, "inode": ad.source.inode, "r": ad.r, "alpha": ad.alpha}
                          for ad in adapters]}
    nbytes = 0
    with atomic_directory(Path(directory), durable=False) as tmp:
        for name, body in ((CONFIG_FILE, config), (MANIFEST_FILE, manifest)):
            raw = json.dumps(body).encode()
            (tmp / name).write_bytes(raw)
            nbytes += len(raw)
    return nbytes


def merge_from_manifest(directory: str | os.PathLike,
                        load_part: Callable[[WeightsSource, int, float], LoraAdapter]) -> LoraAdapter:
    """The merged adapter a manifest directory describes; ``load_part(source, r, alpha)``
    returns one document adapter (and must check the file is the one the manifest names)."""
    return merge_adapters([load_part(*p) for p in read_manifest(directory)], fold_scaling=True)


def read_manifest(directory: str | os.PathLike) -> list[tuple[WeightsSource, int, float]]:
    """The document adapters a manifest directory lists: (tensors file, rank, alpha) each."""
    path = Path(directory) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("format") != MANIFEST_FORMAT:
            raise AdapterError(f"{path}: format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
        parts = [(WeightsSource(str(p["path"]), str(p["sha256"]), int(p["size"]), int(p["mtime_ns"]),
                                int(p["inode"])), int(p["r"]), float(p["alpha"])) for p in manifest["parts"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AdapterError(f"{path}: unreadable merge manifest ({exc})") from None
    if not parts or sum(r for _, r, _ in parts) != manifest.get("r"):
        raise AdapterError(f"{path}: parts do not add up to rank {manifest.get('r')}")
    return parts


def merged_key(doc_ids: list[str], policy: str = "sum") -> str:
    """Cache key of a merge: order-independent hash of the document-id set (and of the merge
    policy, when it is not ``sum``)."""
    h = hashlib.sha256()
    for doc_id in sorted(set(doc_ids)):
        h.update(doc_id.encode("utf-8") + b"\x00")
    if check_merge_policy(policy) != "sum":
        h.update(b"\x01" + policy.encode())
    return h.hexdigest()[:32]


class MergedAdapterCache:
    """Merged adapters written once per document set under ``<root>/merged/<key>/``."""

    def __init__(self, store: AdapterStore, root: str | os.PathLike | None = None, policy: str = "sum"):
        self.store = store
        self.root = Path(root) if root is not None else store.root / "merged"
        self.policy = check_merge_policy(policy)

    def get(self, doc_ids: list[str]) -> Path:
        """Path of the PEFT directory of the merged adapter for ``doc_ids`` (built if missing)."""
        ids = sorted(set(doc_ids))
        path = self.root / merged_key(ids, self.policy)
        if (path / "prag_meta.json").is_file():
            return path
        merged = merge_adapters([self.store.load(i) for i in ids], policy=self.policy)
        merged.meta["doc_ids"] = ids
        merged.save(path, dtype=next(iter(merged.weights.values()))[0].dtype)
        logger.debug("merged %d adapters into %s", len(ids), path)
        return path
