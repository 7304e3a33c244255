"""Merged adapters (what vLLM loads), keyed by document-id set, LRU-cached on disk.

With ``worker_merge`` a directory is a merge manifest (:func:`prag_vllm.merge.write_merge_manifest`,
two small JSON files) and vLLM's worker concatenates the tensors itself (this project's
plugin); otherwise the merged tensors are written here. Concurrent requests for the same
set share one merge (single flight); an entry in use by a running request is pinned and
never evicted. Evicted entries are deleted and unloaded from vLLM.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from prag_vllm.errors import AdapterError
from prag_vllm.lru import ByteLRU
from prag_vllm.merge import check_merge_policy, merge_adapters, merged_key, weighted, write_merge_manifest
from serving.adapters.doc_cache import DocAdapterCache

logger = logging.getLogger(__name__)


@dataclass
class MergedEntry:
    """One merged adapter on disk, as vLLM sees it."""

    key: str
    doc_ids: tuple[str, ...]
    path: Path
    lora_id: int
    """vLLM's integer adapter id (never reused)."""
    rank: int
    nbytes: int
    refs: int = 0
    """Requests currently using it (pinned while > 0)."""
    merge_seconds: float = 0.0
    """Concatenating and writing the merged adapter (or writing its manifest)."""
    manifest: bool = False
    """Written as a merge manifest (vLLM's worker concatenates the tensors)."""
    load_seconds: float = 0.0
    """vLLM loading it (the ``load`` callback of :class:`MergedAdapterLRU`)."""
    pending: asyncio.Future | None = field(default=None, repr=False)
    """Set while the first request builds and loads it; the others wait on it."""

    @property
    def lora_name(self) -> str:
        return f"prag-{self.key[:16]}-{self.lora_id}"

    @property
    def pinned(self) -> bool:
        return self.refs > 0 or self.pending is not None


class MergedAdapterLRU:
    """Merged adapters keyed by document-id set; bounded by ``max_entries`` and ``max_bytes``.
    Used from the event loop only."""

    def __init__(self, docs: DocAdapterCache, root: str | Path, max_entries: int, max_bytes: int,
                 on_evict: Callable[[MergedEntry], None] | None = None, *, worker_merge: bool = False,
                 load: Callable[[MergedEntry], Awaitable[None]] | None = None, policy: str = "sum"):
        self.docs = docs
        self.policy = check_merge_policy(policy)
        """How the documents' updates combine (:data:`prag_vllm.merge.MERGE_POLICIES`)."""
        self.load = load
        """Loads a new entry into vLLM before anyone uses it, and a cached manifest again
        when it is acquired; if it fails, the entry is dropped and every request waiting
        for it gets the error."""
        self.worker_merge = worker_merge
        """Write merge manifests (vLLM's worker merges, with this project's plugin) instead of tensors."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.on_evict = on_evict
        self._entries: ByteLRU[str, MergedEntry] = ByteLRU(max_bytes, max_entries=max_entries,
                                                          pinned=lambda e: e.pinned, on_evict=self._evicted)
        self._next_id = 1
        self.hits = 0
        self.misses = 0

    @property
    def max_entries(self) -> int:
        return self._entries.max_entries

    @property
    def max_bytes(self) -> int:
        return self._entries.max_bytes

    @property
    def size(self) -> int:
        return sum(1 for e in self._entries.values() if e.pending is None)

    @property
    def nbytes(self) -> int:
        return self._entries.nbytes

    async def acquire(self, doc_ids: list[str]) -> tuple[MergedEntry | None, list[str], bool]:
        """Pin the merged adapter of the usable adapters among ``doc_ids``.

        Returns (entry or None when no document has a usable adapter, the document ids
        that were left out because their adapter is unusable, cache hit?). Call
        :meth:`release` with the entry when the request is done.
        """
        ids = sorted(set(doc_ids))
        entry = self._entries.peek(merged_key(ids, self.policy)) if ids else None
        left_out: list[str] = []
        if entry is None:
            got = await asyncio.to_thread(self.docs.get_many, ids)
            usable = [i for i, a in zip(ids, got) if a is not None]
            left_out = [i for i in ids if i not in usable]
            ids = usable
            if not ids:
                return None, left_out, False
            entry = self._entries.peek(merged_key(ids, self.policy))
        if entry is None:
            return await self._create(ids), left_out, False
        entry.refs += 1
        if entry.pending is not None:  # another request is merging (and loading) this set right now
            try:
                await asyncio.shield(entry.pending)
            except BaseException:
                entry.refs -= 1
                raise
            self.hits += 1
            return entry, left_out, True
        self._entries.get(entry.key)  # the most recently used now
        self.hits += 1
        if entry.manifest and self.load is not None:
            await self._reload(entry)
        return entry, left_out, True

    def release(self, entry: MergedEntry | None) -> None:
        if entry is not None:
            entry.refs -= 1
            self._entries.evict()

    def clear(self) -> None:
        for e in self._entries.values():
            shutil.rmtree(e.path, ignore_errors=True)
        self._entries.clear()

    async def _create(self, ids: list[str]) -> MergedEntry:
        """Build and load the merged adapter of ``ids`` (a miss), pinned; waiters share it."""
        self.misses += 1
        key = merged_key(ids, self.policy)
        entry = MergedEntry(key=key, doc_ids=tuple(ids), path=self.root / key, lora_id=self._next_id, rank=0,
                            nbytes=0, refs=1, manifest=self.worker_merge, pending=asyncio.get_running_loop().create_future())
        self._next_id += 1
        self._entries.put(key, entry, 0)
        try:
            t0 = time.perf_counter()
            entry.rank, entry.nbytes = await asyncio.to_thread(self._build, ids, entry.path)
            t1 = time.perf_counter()
            entry.merge_seconds = t1 - t0
            if self.load is not None:
                await self.load(entry)
                entry.load_seconds = time.perf_counter() - t1
        except BaseException as exc:
            self._drop(entry)
            entry.pending.set_exception(exc if isinstance(exc, Exception) else AdapterError("merge cancelled"))
            entry.pending.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        entry.pending.set_result(None)
        entry.pending = None
        self._entries.put(key, entry, entry.nbytes)  # its size known now (evicts down to the bounds)
        return entry

    def _build(self, ids: list[str], path: Path) -> tuple[int, int]:
        adapters = [self.docs.get(i) for i in ids]
        if any(a is None for a in adapters):
            raise AdapterError(f"adapter of one of {ids} became unusable during the merge")
        if self.worker_merge:  # mean: the parts' alphas times 1/k (the factors as they are)
            return sum(a.r for a in adapters), write_merge_manifest(weighted(adapters, self.policy), path, ids)
        merged = merge_adapters(adapters, fold_scaling=True, policy=self.policy)  # vLLM then skips its rescale
        merged.meta["doc_ids"] = ids
        merged.save(path, dtype=next(iter(merged.weights.values()))[0].dtype, scratch=True)
        nbytes = sum(f.stat().st_size for f in path.iterdir())
        return merged.r, nbytes

    async def _reload(self, entry: MergedEntry) -> None:
        """Load a cached manifest again (pinned by the caller): a no-op while vLLM still holds
        it; if vLLM's own LRU dropped it, the worker rebuilds it from the document files now,
        so a failure is this request's error and not one inside vLLM's engine step. On
        failure the entry is unpinned and dropped: the next request merges anew."""
        try:
            await self.load(entry)
        except BaseException:
            self.release(entry)
            self._drop(entry)
            raise

    def _drop(self, entry: MergedEntry) -> None:
        """Remove ``entry`` (failed, not evicted: vLLM does not hold it) and its directory."""
        if self._entries.peek(entry.key) is entry:
            self._entries.pop(entry.key)
            shutil.rmtree(entry.path, ignore_errors=True)

    def _evicted(self, key: str, entry: MergedEntry) -> None:
        shutil.rmtree(entry.path, ignore_errors=True)
        logger.debug("evicted merged adapter %s (%d documents)", key, len(entry.doc_ids))
        if self.on_evict is not None:
            self.on_evict(entry)
