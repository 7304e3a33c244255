"""Reading the corpus's document adapters at start (``preload_adapters``), before any request asks.

Adapters are read and validated into the :class:`~serving.adapters.doc_cache.DocAdapterCache`
until it is full; with ``worker_merge`` they are handed to vLLM's worker too, a batch at a
time (the engine pauses while the worker reads them), until the worker says it is full.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from prag_vllm.adapters import LoraAdapter
from serving.adapters.doc_cache import DocAdapterCache

logger = logging.getLogger(__name__)

PRELOAD_BATCH = 8
"""Document adapters handed to vLLM's worker per preload call (the engine pauses while it reads them)."""

OnBatch = Callable[[list[LoraAdapter]], tuple[int, bool]]
"""Hands validated adapters to vLLM's worker; returns (documents the worker holds now, worker full?)."""


class WorkerBatches:
    """Validated adapters collected and handed to vLLM's worker ``size`` at a time; once the
    worker is full, or a hand-over failed, nothing more is sent (the server keeps serving:
    requests read what was not preloaded)."""

    def __init__(self, on_batch: OnBatch | None, size: int, state: dict):
        self.on_batch = on_batch
        self.size = size
        self.state = state
        """Where ``worker_documents`` is reported (the cache's ``preload_state``)."""
        self.pending: list[LoraAdapter] = []

    def add(self, adapter: LoraAdapter) -> None:
        if adapter.source is not None:  # read from a file: the worker can read it too
            self.pending.append(adapter)
        if len(self.pending) >= self.size:
            self.send()

    def send(self) -> None:
        if self.on_batch is not None and self.pending:
            try:
                held, full = self.on_batch(list(self.pending))
            except Exception as exc:
                logger.warning("preloading document adapters into vLLM's worker failed: %s", exc)
                self.on_batch = None
            else:
                self.state["worker_documents"] = held
                if full:
                    self.on_batch = None
        self.pending.clear()


def preload(cache: DocAdapterCache, doc_ids: list[str], *, background: bool = False, on_batch: OnBatch | None = None,
            batch: int = PRELOAD_BATCH) -> threading.Thread | None:
    """Read and validate the adapters of ``doc_ids`` into ``cache`` until it is full
    (``background``: in a daemon thread, returned). ``on_batch`` gets every ``batch``
    validated adapters (see :class:`WorkerBatches`). Progress is in ``cache.preload_state``."""
    if background:
        t = threading.Thread(target=preload, args=(cache, doc_ids), kwargs={"on_batch": on_batch, "batch": batch},
                             name="prag-preload-adapters", daemon=True)
        t.start()
        return t
    state = cache.preload_state
    t0, n = time.perf_counter(), 0
    state.update(running=True, documents=0, worker_documents=0 if on_batch else None)
    worker = WorkerBatches(on_batch, batch, state)
    for doc_id in doc_ids:
        if cache.full():  # stop before reading what would evict what was just read
            break
        adapter = cache.get(doc_id)
        if adapter is not None:
            n += 1
            state["documents"] = n
            worker.add(adapter)
    worker.send()
    state["running"] = False
    logger.info("preloaded %d document adapters (%.1f MiB) in %.1f s%s", n, cache.nbytes / 2**20,
                time.perf_counter() - t0, "" if state["worker_documents"] is None else
                f"; {state['worker_documents']} in vLLM's worker")
    return None
