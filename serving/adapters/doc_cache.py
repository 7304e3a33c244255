"""Validated per-document adapters in memory (LRU), and the documents whose adapter is unusable."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from prag_vllm.adapters import AdapterStore, LoraAdapter
from prag_vllm.errors import AdapterError
from prag_vllm.lru import ByteLRU
from serving.adapters.validate import check_base_model, check_fits

logger = logging.getLogger(__name__)

RECORD_BYTES = 2048
"""What a validated adapter without its tensors is counted as (``keep_tensors=False``)."""

READ_THREADS = 4
"""Threads reading the adapters of one request that are not in memory yet."""


class DocAdapterCache:
    """Validated per-document adapters, LRU in memory; thread-safe.

    A document whose adapter is unusable (corrupt, wrong shapes or rank, another base
    model) is remembered in :attr:`rejected` and never read again: it is answered in
    context instead."""

    def __init__(self, store: AdapterStore, shapes: dict[str, tuple[int, int]], max_rank: int,
                 max_bytes: int = 512 << 20, model_id: str | None = None, *, keep_tensors: bool = True):
        self.store = store
        self.keep_tensors = keep_tensors
        """False (vLLM's worker merges from manifests): keep only what a manifest needs (rank,
        alpha, the validated file's identity), so the bound holds far more documents."""
        self.shapes = shapes
        """Module path -> (in, out) of the served model's FFN projections (:func:`prag_vllm.ffn.ffn_shapes`)."""
        self.max_rank = max_rank
        self.model_id = model_id
        """Identity of the served model (:func:`prag_vllm.adapters.model_identity`); adapters
        stamped with another one are rejected."""
        self._items: ByteLRU[str, LoraAdapter] = ByteLRU(max_bytes)
        self.rejected: dict[str, str] = {}
        """Document id -> why its adapter is unusable."""
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self.preload_state: dict = {"running": False, "documents": 0, "worker_documents": None}
        """Progress of :func:`serving.adapters.preload.preload` (``worker_documents`` None: not
        sent to vLLM's worker); shown by ``GET /health``."""

    def has(self, doc_id: str) -> bool:
        """An adapter file exists and was not rejected."""
        return doc_id not in self.rejected and self.store.has(doc_id)

    def get(self, doc_id: str) -> LoraAdapter | None:
        """The validated adapter, or None if there is none or it is unusable (logged once)."""
        adapter = self._items.get(doc_id)
        if adapter is not None:
            return adapter
        if doc_id in self.rejected or not self.store.has(doc_id):
            return None
        try:
            adapter = self.store.load(doc_id)
            check_fits(adapter, self.shapes, self.max_rank)
            check_base_model(adapter, self.model_id)
        except AdapterError as exc:
            logger.warning("adapter of document %r rejected, it will be answered in context: %s", doc_id, exc)
            with self._lock:
                self.rejected[doc_id] = str(exc)
            return None
        if self.keep_tensors:
            nbytes = sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in adapter.weights.values())
        else:
            adapter.weights, nbytes = {}, RECORD_BYTES
        return self._items.setdefault(doc_id, adapter, nbytes)  # another thread may have read it meanwhile

    def get_many(self, doc_ids: list[str]) -> list[LoraAdapter | None]:
        """:meth:`get` for several documents; those not in memory are read in parallel.
        File reads and hashing release the GIL; ``safetensors.torch.load`` holds it (py-spy),
        so on this 2-core machine the gain over one thread is small."""
        cold = sum(i not in self._items for i in doc_ids)
        if cold <= 1:
            return [self.get(i) for i in doc_ids]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="prag-doc-adapters")
        return list(self._pool.map(self.get, doc_ids))

    def full(self) -> bool:
        """One more adapter (of the average size held) would evict one."""
        held = len(self._items)
        return bool(held) and not self._items.fits(self._items.nbytes // held)

    def forget(self, doc_ids) -> None:
        """Drop ``doc_ids`` from memory (their files changed): the next :meth:`get` reads and validates them again."""
        for doc_id in doc_ids:
            self._items.pop(doc_id)

    @property
    def nbytes(self) -> int:
        return self._items.nbytes

    @property
    def max_bytes(self) -> int:
        return self._items.max_bytes

    def __len__(self) -> int:
        return len(self._items)
