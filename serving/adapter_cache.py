"""Update, online: per-document adapters -> one merged adapter per document set, LRU-cached.

Two caches, both bounded:

* :class:`DocAdapterCache` keeps validated per-document adapters in memory (so a merge
  reads no file), and remembers documents whose adapter is unusable (corrupt, wrong
  shapes): those are answered in context instead and never reach vLLM.
* :class:`MergedAdapterLRU` keeps merged adapters (PEFT directories vLLM loads) keyed by
  the sorted document-id set, bounded in count and bytes. With ``worker_merge`` a
  directory is a merge manifest (:func:`prag_vllm.merge.write_merge_manifest`, two small
  JSON files) and vLLM's worker concatenates the tensors itself (this project's plugin);
  otherwise the merged tensors are written here. Concurrent requests for the
  same set share one merge (single flight); an entry in use by a running request is
  pinned and never evicted. Evicted entries are deleted and unloaded from vLLM.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from prag_vllm.adapters import AdapterStore, LoraAdapter
from prag_vllm.errors import AdapterError
from prag_vllm.lru import ByteLRU
from prag_vllm.merge import merge_adapters, merged_key, write_merge_manifest

logger = logging.getLogger(__name__)


def expected_shapes(model_config) -> dict[str, tuple[int, int]]:
    """Module path -> (in, out) for every FFN projection of ``model_config``."""
    h, i, n = model_config.hidden_size, model_config.intermediate_size, model_config.num_hidden_layers
    io = {"gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    return {f"model.layers.{layer}.mlp.{name}": dims for layer in range(n) for name, dims in io.items()}


def check_fits(adapter: LoraAdapter, shapes: dict[str, tuple[int, int]], max_rank: int) -> None:
    """Raise :class:`AdapterError` unless every module of ``adapter`` exists in the model with matching shapes."""
    if not 1 <= adapter.r <= max_rank:
        raise AdapterError(f"rank {adapter.r} outside 1..{max_rank}")
    for module, (a, b) in adapter.weights.items():
        if module not in shapes:
            raise AdapterError(f"module {module} is not an FFN projection of the served model")
        fan_in, fan_out = shapes[module]
        if tuple(a.shape) != (adapter.r, fan_in) or tuple(b.shape) != (fan_out, adapter.r):
            raise AdapterError(f"module {module}: shapes {tuple(a.shape)}/{tuple(b.shape)} do not fit the served model "
                               f"({adapter.r}x{fan_in} / {fan_out}x{adapter.r})")


PRELOAD_BATCH = 8
"""Document adapters handed to vLLM's worker per preload call (the engine pauses while it reads them)."""

RECORD_BYTES = 2048
"""What a validated adapter without its tensors is counted as (``keep_tensors=False``)."""


class DocAdapterCache:
    """Validated per-document adapters, LRU in memory; thread-safe."""

    def __init__(self, store: AdapterStore, shapes: dict[str, tuple[int, int]], max_rank: int,
                 max_bytes: int = 512 << 20, model_id: str | None = None, *, keep_tensors: bool = True):
        self.store = store
        self.keep_tensors = keep_tensors
        """False (vLLM's worker merges from manifests): keep only what a manifest needs (rank,
        alpha, the validated file's identity), so the bound holds far more documents."""
        self.shapes = shapes
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
        """Progress of :meth:`preload` (``worker_documents`` None: not sent to vLLM's worker)."""

    def has(self, doc_id: str) -> bool:
        """An adapter file exists and was not rejected."""
        return doc_id not in self.rejected and self.store.has(doc_id)

    def get(self, doc_id: str) -> LoraAdapter | None:
        """The validated adapter, or None if there is none or it is unusable (logged once)."""
        adapter = self._items.get(doc_id)
        if adapter is not None:
            return adapter
        if doc_id in self.rejected:
            return None
        if not self.store.has(doc_id):
            return None
        try:
            adapter = self.store.load(doc_id)
            check_fits(adapter, self.shapes, self.max_rank)
            trained_on = adapter.meta.get("base_model_id")
            if self.model_id and trained_on and trained_on != self.model_id:
                raise AdapterError(f"trained on another base model (identity {trained_on}, served {self.model_id})")
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
            self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="prag-doc-adapters")
        return list(self._pool.map(self.get, doc_ids))

    def preload(self, doc_ids: list[str], *, background: bool = False,
                on_batch: Callable[[list[LoraAdapter]], tuple[int, bool]] | None = None,
                batch: int = PRELOAD_BATCH) -> threading.Thread | None:
        """Read and validate adapters of ``doc_ids`` until the cache is full (``background``:
        in a daemon thread, returned). ``on_batch`` gets every ``batch`` validated adapters
        (vLLM's worker reads them too) and returns (documents the worker holds now, worker
        full?); once full or failed it is not called again. Progress is in :attr:`preload_state`."""
        if background:
            t = threading.Thread(target=self.preload, args=(doc_ids,), kwargs={"on_batch": on_batch, "batch": batch},
                                 name="prag-preload-adapters", daemon=True)
            t.start()
            return t
        t0, n, pending = time.perf_counter(), 0, []
        self.preload_state.update(running=True, documents=0, worker_documents=0 if on_batch else None)

        def send() -> None:
            nonlocal on_batch
            if on_batch is not None and pending:
                try:
                    held, full = on_batch(list(pending))
                except Exception as exc:  # the server keeps serving; requests read what was not preloaded
                    logger.warning("preloading document adapters into vLLM's worker failed: %s", exc)
                    on_batch = None
                else:
                    self.preload_state["worker_documents"] = held
                    if full:
                        on_batch = None
            pending.clear()

        for doc_id in doc_ids:
            held = len(self._items)  # stop when one more (of the average size) would evict what was just read
            if held and not self._items.fits(self._items.nbytes // held):
                break
            adapter = self.get(doc_id)
            if adapter is not None:
                n += 1
                self.preload_state["documents"] = n
                if adapter.source is not None:
                    pending.append(adapter)
                if len(pending) >= batch:
                    send()
        send()
        self.preload_state["running"] = False
        logger.info("preloaded %d document adapters (%.1f MiB) in %.1f s%s", n, self._items.nbytes / 2**20,
                    time.perf_counter() - t0, "" if self.preload_state["worker_documents"] is None else
                    f"; {self.preload_state['worker_documents']} in vLLM's worker")
        return None

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

    @property
    def lora_name(self) -> str:
        return f"prag-{self.key[:16]}-{self.lora_id}"


class MergedAdapterLRU:
    """Merged adapters keyed by document-id set; bounded by ``max_entries`` and ``max_bytes``."""

    def __init__(self, docs: DocAdapterCache, root: str | Path, max_entries: int, max_bytes: int,
                 on_evict: Callable[[MergedEntry], None] | None = None, *, worker_merge: bool = False,
                 load: Callable[[MergedEntry], Awaitable[None]] | None = None):
        self.docs = docs
        self.load = load
        """Loads a new entry into vLLM before anyone uses it, and a cached manifest again
        when it is acquired; if it fails, the entry is dropped and every request waiting
        for it gets the error."""
        self.worker_merge = worker_merge
        """Write merge manifests (vLLM's worker merges, with this project's plugin) instead of tensors."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.on_evict = on_evict
        self._entries: OrderedDict[str, MergedEntry] = OrderedDict()
        self._next_id = 1
        self.hits = 0
        self.misses = 0

    @property
    def size(self) -> int:
        return sum(1 for e in self._entries.values() if e.pending is None)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    async def acquire(self, doc_ids: list[str]) -> tuple[MergedEntry | None, list[str], bool]:
        """Pin the merged adapter of the usable adapters among ``doc_ids``.

        Returns (entry or None when no document has a usable adapter, the document ids
        that were left out because their adapter is unusable, cache hit?). Call
        :meth:`release` with the entry when the request is done.
        """
        ids = sorted(set(doc_ids))
        entry = self._entries.get(merged_key(ids)) if ids else None
        if entry is None:
            got = await asyncio.to_thread(self.docs.get_many, ids)
            usable = [i for i, a in zip(ids, got) if a is not None]
            left_out = [i for i in ids if i not in usable]
            ids = usable
            if not ids:
                return None, left_out, False
            entry = self._entries.get(merged_key(ids))
        else:
            left_out = []
        if entry is not None:
            if entry.pending is not None:  # another request is merging this set right now
                entry.refs += 1
                try:
                    await asyncio.shield(entry.pending)
                except BaseException:
                    entry.refs -= 1
                    raise
                self.hits += 1
                return entry, left_out, True
            self._entries.move_to_end(entry.key)
            entry.refs += 1
            self.hits += 1
            if entry.manifest and self.load is not None:
                await self._reload(entry)
            return entry, left_out, True
        self.misses += 1
        key = merged_key(ids)
        entry = MergedEntry(key=key, doc_ids=tuple(ids), path=self.root / key, lora_id=self._next_id, rank=0,
                            nbytes=0, refs=1, manifest=self.worker_merge, pending=asyncio.get_running_loop().create_future())
        self._next_id += 1
        self._entries[key] = entry
        try:
            t0 = time.perf_counter()
            entry.rank, entry.nbytes = await asyncio.to_thread(self._build, ids, entry.path)
            t1 = time.perf_counter()
            entry.merge_seconds = t1 - t0
            if self.load is not None:
                await self.load(entry)
                entry.load_seconds = time.perf_counter() - t1
        except BaseException as exc:
            del self._entries[key]
            shutil.rmtree(entry.path, ignore_errors=True)
            entry.pending.set_exception(exc if isinstance(exc, Exception) else AdapterError("merge cancelled"))
            entry.pending.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        entry.pending.set_result(None)
        entry.pending = None
        self._evict()
        return entry, left_out, False

    def release(self, entry: MergedEntry | None) -> None:
        if entry is not None:
            entry.refs -= 1
            self._evict()

    def _build(self, ids: list[str], path: Path) -> tuple[int, int]:
        adapters = [self.docs.get(i) for i in ids]
        if any(a is None for a in adapters):
            raise AdapterError(f"adapter of one of {ids} became unusable during the merge")
        if self.worker_merge:
            return sum(a.r for a in adapters), write_merge_manifest(adapters, path, ids)
        merged = merge_adapters(adapters, fold_scaling=True)  # vLLM then skips its rescale on load
        merged.meta = {"kind": "merged", "doc_ids": ids}
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
            if self._entries.get(entry.key) is entry:
                del self._entries[entry.key]
                shutil.rmtree(entry.path, ignore_errors=True)
            raise

    def _evict(self) -> None:
        while len(self._entries) > self.max_entries or self.nbytes > self.max_bytes:
            victim = next((e for e in self._entries.values() if e.refs <= 0 and e.pending is None), None)
            if victim is None:  # everything pinned: over the bound until requests finish
                return
            del self._entries[victim.key]
            shutil.rmtree(victim.path, ignore_errors=True)
            logger.debug("evicted merged adapter %s (%d documents)", victim.key, len(victim.doc_ids))
            if self.on_evict is not None:
                self.on_evict(victim)

    def clear(self) -> None:
        for e in list(self._entries.values()):
            shutil.rmtree(e.path, ignore_errors=True)
        self._entries.clear()
