"""Merged adapters built in vLLM's worker from a manifest (:func:`prag_vllm.merge.write_merge_manifest`).

Without this, every cold request's adapter is concatenated and written by the server,
then read and parsed again by vLLM's worker. With it, the server writes two small JSON
files; when vLLM loads that directory (``LoRAModel.from_local_checkpoint``) the worker
takes the document adapters from a byte-bounded LRU of those it has already read
(``PRAG_WORKER_ADAPTER_CACHE_MB``, default 1024), kept with their scaling folded into B.
The merged A and B are not built: each is a :class:`~.parts.RankParts` of the documents'
tensors, copied into vLLM's LoRA slot when the adapter is activated. What lands in the
slot is exactly what the merged file would give (``merge_adapters(..., fold_scaling=True)``).
Where the worker's LoRA layers sit in slot pools (:mod:`.pools`, the default), the model has
no factors at all (:func:`pooled_model`): the pools copy the documents' stacked factors into
the slot. An adapter vLLM holds keeps its documents' tensors alive after the cache drops them, so
memory is bounded by the cache plus the documents of the adapters vLLM holds
(``max_cpu_loras``); documents shared by several adapters are held once.

A document adapter is taken from memory when its sha256 matches the manifest. Read from
disk, it is trusted without re-hashing only if the file is still the one the server
validated (same size, mtime and inode); otherwise it is hashed, and a mismatch raises
``ValueError`` (the adapter was replaced since: vLLM reports the failed load to the
server, which re-reads it). Directories without a manifest load as before.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from typing import NamedTuple

from prag_vllm.adapters import PEFT_PREFIX, WEIGHTS_FILE, LoraAdapter, WeightsSource, read_weights
from prag_vllm.errors import AdapterError
from prag_vllm.lru import ByteLRU
from prag_vllm.merge import MANIFEST_FILE, check_mergeable, folded, read_manifest
from prag_vllm.vllm_plugin import patching, settings
from prag_vllm.vllm_plugin.parts import RankParts, as_words
from prag_vllm.vllm_plugin.patching import Patcher
from prag_vllm.vllm_plugin.pools import DocStack, stack_document

logger = logging.getLogger(__name__)


def cache_bytes_from_env() -> int:
    """``PRAG_WORKER_ADAPTER_CACHE_MB`` in bytes."""
    return settings.WORKER_ADAPTER_CACHE_MB.bytes()


def column_major_b(adapter: LoraAdapter) -> LoraAdapter:
    """``adapter`` with every B (``out x rank``) stored column-major: the same values, but a
    slot write (:func:`.parts._fill`) that converts dtypes then reads each document's rank
    columns as contiguous rows. Writing Qwen2.5-0.5B's gate/up B slot from three rank-2
    documents: 70 -> 60 µs into a float32 slot (probe, one process, AVX2 machine). Parts
    already in the slot's dtype are kept row-major: one ``torch.cat`` is fastest for them
    (56 µs row-major vs 65 µs column-major, same probe)."""
    adapter.weights = {m: (a, b.t().contiguous().t()) for m, (a, b) in adapter.weights.items()}
    return adapter


def converted(adapter: LoraAdapter, dtype) -> LoraAdapter:
    """``adapter`` with its factors in ``dtype`` (contiguous): what a LoRA slot of that dtype
    gets from them, converted once here instead of at every activation."""
    adapter.weights = {m: (a.to(dtype).contiguous(), b.to(dtype).contiguous()) for m, (a, b) in adapter.weights.items()}
    return adapter


def _nbytes(adapter: LoraAdapter) -> int:
    return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in adapter.weights.values())


class CachedDocument(NamedTuple):
    """One document adapter in the worker's cache."""

    adapter: LoraAdapter
    """Its factors, scaling folded into B."""
    words: dict
    """Where kept in the slots' dtype: module -> its B as machine words (:func:`.parts.as_words`,
    for the slot writes), or None where a row is no word; else empty."""
    stacks: dict[str, DocStack]
    """Where kept in the slots' dtype: projection kind -> every layer's factors in one tensor
    (:func:`.pools.stack_document`; ``adapter``'s factors are views of them); else empty."""


def _part_key(source: WeightsSource, alpha: float) -> str:
    """A cached part: the file's sha256 and the alpha its manifest gives it (a ``mean`` merge
    weights one document's alpha by 1/k, so one file is folded differently per k)."""
    return f"{source.sha256}@{float(alpha)!r}"


class PartCache:
    """Document adapters by sha256 and alpha, with their scaling folded into B
    (:func:`prag_vllm.merge.folded`), least recently used first out; thread-safe (the
    ``hits``/``misses``/``hashed`` counters are statistics, not locked)."""

    def __init__(self, max_bytes: int, dtype=None):
        self._items: ByteLRU[str, tuple[LoraAdapter, dict]] = ByteLRU(max_bytes)
        self.hits = self.misses = self.hashed = 0
        self.dtype = dtype
        """The dtype the factors are kept in: the engine's LoRA dtype, so that activating an
        adapter copies them into the slots without converting (on a float32 engine, bf16
        documents converted at every activation cost ~4 ms of it, ``docs/notes/lora_cpu.md``).
        None: as read from the file. Set by :meth:`keep_as`."""
        self._growth = 1.0
        """Bytes in memory per byte of file, as last seen (for :meth:`preload`'s bound)."""

    def keep_as(self, dtype) -> None:
        """Keep factors in ``dtype`` from now on; adapters cached in another dtype are dropped."""
        if dtype == self.dtype:
            return
        if len(self._items):
            logger.info("worker document cache: factors now kept in %s; %d cached documents dropped", dtype,
                        len(self._items))
            self._items.clear()
        self.dtype = dtype

    @property
    def max_bytes(self) -> int:
        return self._items.max_bytes

    def load(self, source: WeightsSource, r: int, alpha: float) -> LoraAdapter:
        return self.document(source, r, alpha)[0]

    def document(self, source: WeightsSource, r: int, alpha: float) -> CachedDocument:
        """The document as cached (read and checked if it was not)."""
        key = _part_key(source, alpha)
        item = self._items.get(key)
        if item is not None:
            self.hits += 1
            return item
        try:
            raw, st = read_weights(source.path)
        except OSError as exc:
            raise AdapterError(f"document adapter {source.path} of a merge manifest: unreadable ({exc})") from None
        if not source.unchanged(st):
            self.hashed += 1
            if hashlib.sha256(raw).hexdigest() != source.sha256:
                raise AdapterError(f"document adapter {source.path} changed after the server validated it "
                                   f"(sha256 differs from the merge manifest)")
        adapter = folded(LoraAdapter.from_bytes(raw, r, alpha, where=source.path))
        stacks = {}
        if self.dtype is None:
            adapter = column_major_b(adapter)
        else:  # in the slots' dtype, every layer of a projection kind in one tensor (for the slot pools)
            adapter.weights, stacks = stack_document(converted(adapter, self.dtype).weights)
        words = {} if self.dtype is None else {m: as_words(b) for m, (_, b) in adapter.weights.items()}
        nbytes = _nbytes(adapter)
        self._growth = nbytes / max(1, len(raw))
        self.misses += 1
        return self._items.setdefault(key, CachedDocument(adapter, words, stacks), nbytes)

    def preload(self, parts: list[tuple[WeightsSource, int, float]]) -> int:
        """Read ``parts`` not cached yet while they fit without evicting anything; returns
        how many are cached now. A part that fails to load is skipped (its request will
        report it)."""
        n = 0
        for source, r, alpha in parts:
            cached = _part_key(source, alpha) in self._items
            if not cached and not self._items.fits(int(source.size * self._growth)):
                break
            if not cached:
                try:
                    self.load(source, r, alpha)
                except AdapterError as exc:
                    logger.warning("preload: %s", exc)
                    continue
            n += 1
        return n

    @property
    def nbytes(self) -> int:
        return self._items.nbytes

    def __len__(self) -> int:
        return len(self._items)


@functools.cache
def part_cache() -> PartCache:
    """This process's cache (created on first use, sized from the environment)."""
    return PartCache(cache_bytes_from_env())


def part_record(adapter: LoraAdapter) -> list:
    """What :func:`preload_parts` takes for one validated document adapter (read from a file):
    ``[path, sha256, size, mtime_ns, inode, r, alpha]``, plain values for vLLM's RPC."""
    s = adapter.source
    return [s.path, s.sha256, s.size, s.mtime_ns, s.inode, adapter.r, adapter.alpha]


def preload_parts(worker, parts: list[list]) -> dict:
    """Worker RPC ``prag_preload_parts``: read document adapters into this worker's cache
    ahead of the manifests that will name them. ``parts``: :func:`part_record` of each, as
    the server validated them. Returns what is cached now."""
    try:
        todo = [(WeightsSource(str(p[0]), str(p[1]), int(p[2]), int(p[3]), int(p[4])), int(p[5]), float(p[6]))
                for p in parts]
    except (ValueError, TypeError, IndexError) as exc:
        raise ValueError(f"prag_preload_parts: bad part list ({exc})") from None
    cache = part_cache()
    cache.keep_as(_lora_dtype(worker))
    n = cache.preload(todo)
    return {"preloaded": n, "full": n < len(todo), "documents": len(cache), "bytes": cache.nbytes,
            "files_read": cache.misses}


def _lora_dtype(worker):
    """The dtype of the worker's LoRA slots (None where it cannot be told)."""
    import torch

    dtype = getattr(getattr(getattr(worker, "vllm_config", None), "lora_config", None), "lora_dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else None


def has_manifest(lora_dir: str) -> bool:
    return os.path.isfile(os.path.join(lora_dir, MANIFEST_FILE)) and not os.path.isfile(
        os.path.join(lora_dir, WEIGHTS_FILE))


def manifest_documents(lora_dir: str, expected_lora_modules, dtype=None) -> tuple[list[CachedDocument], list[str]]:
    """The documents a manifest directory names, from the worker's cache (read and checked
    if not cached), kept as ``dtype`` (the LoRA slots' dtype; None: their own), and the
    modules they target; ``ValueError`` (vLLM's load error) if they cannot be merged."""
    import torch

    if isinstance(dtype, torch.dtype):
        part_cache().keep_as(dtype)
    try:
        docs = [part_cache().document(*p) for p in read_manifest(lora_dir)]
        modules = check_mergeable([d.adapter for d in docs])
    except AdapterError as exc:
        raise ValueError(f"While loading {lora_dir}: {exc}") from None
    unexpected = sorted({m.rsplit(".", 1)[-1] for m in modules} - set(expected_lora_modules))
    if unexpected:
        raise ValueError(f"While loading {lora_dir}, expected target modules in {expected_lora_modules} "
                         f"but received {unexpected}")
    return docs, modules


def manifest_parts(lora_dir: str, expected_lora_modules, dtype=None,
                   documents: tuple[list[CachedDocument], list[str]] | None = None) -> dict[str, RankParts]:
    """PEFT tensor name -> :class:`RankParts` of the merged adapter a manifest directory
    describes, to be loaded as ``dtype`` (the LoRA slots' dtype; None: the parts' own);
    ``documents``: :func:`manifest_documents` of it, if the caller has them."""
    import torch

    if not isinstance(dtype, torch.dtype):
        dtype = None
    docs, modules = documents or manifest_documents(lora_dir, expected_lora_modules, dtype)
    adapters = [d.adapter for d in docs]
    out = {}
    for m in modules:
        if len({ad.weights[m][0].shape[1] for ad in adapters}) != 1 or len({ad.weights[m][1].shape[0] for ad in adapters}) != 1:
            raise ValueError(f"While loading {lora_dir}: the documents' factors of {m} differ in size")
        out[f"{PEFT_PREFIX}{m}.lora_A.weight"] = RankParts.trusted([ad.weights[m][0] for ad in adapters], 0, dtype)
        out[f"{PEFT_PREFIX}{m}.lora_B.weight"] = RankParts.trusted([ad.weights[m][1] for ad in adapters], 1, dtype,
                                                                   [d.words.get(m) for d in docs])
    return out


def pooled_model(cls, lora_model_id: int, docs: list[CachedDocument]):
    """A ``LoRAModel`` (``cls``) of the documents for this worker's slot pools: no factors of
    its own (``loras`` empty: nothing to build or pack), the documents' stacks as
    ``_prag_docs``, which the pools' activation writes; None where the pools cannot take
    them (the caller builds the full model)."""
    from prag_vllm.vllm_plugin import pools

    slot_pools = pools.current()
    stacks = [d.stacks for d in docs]
    if slot_pools is None or not all(stacks) or not slot_pools.accepts(stacks):
        return None
    model = cls(lora_model_id, rank=sum(next(iter(s.values())).a.shape[1] for s in stacks), loras={})
    model._prag_docs = stacks
    return model


def install(patcher: Patcher | None = None) -> None:
    """Let ``LoRAModel.from_local_checkpoint`` load manifest directories (idempotent)."""
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.utils import get_lora_id
    from vllm.v1.worker.worker_base import WorkerBase

    from prag_vllm.vllm_plugin import parts, pools

    p = patching.default(patcher)
    if getattr(LoRAModel, "_prag_manifest", False):
        return
    parts.install(p)  # RankParts reach vLLM's set_lora
    pools.install(p)  # manifests' adapters activate in a few copies
    cache_bytes_from_env()  # a bad setting fails here, with its name, not at the first load
    original = LoRAModel.from_local_checkpoint.__func__

    @functools.wraps(original)
    def from_local_checkpoint(cls, lora_dir, expected_lora_modules, peft_helper, *, lora_model_id=None,
                              device="cuda", dtype=None, model_vocab_size=None, weights_mapper=None,
                              skip_prefixes=None, **kwargs):
        if not has_manifest(lora_dir):
            return original(cls, lora_dir, expected_lora_modules, peft_helper, lora_model_id=lora_model_id,
                            device=device, dtype=dtype, model_vocab_size=model_vocab_size,
                            weights_mapper=weights_mapper, skip_prefixes=skip_prefixes, **kwargs)
        if kwargs.get("moe_ep_spec") is not None:
            raise ValueError(f"{lora_dir}: merge manifests are not supported with expert parallelism")
        lora_model_id = get_lora_id() if lora_model_id is None else lora_model_id
        documents = manifest_documents(lora_dir, expected_lora_modules, dtype)
        model = pooled_model(cls, lora_model_id, documents[0])
        if model is not None:
            return model
        return cls.from_lora_tensors(
            lora_model_id=lora_model_id, tensors=manifest_parts(lora_dir, expected_lora_modules, dtype, documents),
            peft_helper=peft_helper, device=device, dtype=dtype, model_vocab_size=model_vocab_size,
            weights_mapper=weights_mapper, skip_prefixes=skip_prefixes)

    p.set(LoRAModel, "from_local_checkpoint", classmethod(from_local_checkpoint))
    p.set(LoRAModel, "_prag_manifest", True)
    # a method every vLLM worker has, for the server's collective_rpc (why not vLLM's
    # ``worker_extension_cls``: docs/design/cpu_lora.md)
    p.set(WorkerBase, "prag_preload_parts", preload_parts)
    logger.debug("prag: merge manifests load in the worker")
