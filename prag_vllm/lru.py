"""A least-recently-used map bounded by the bytes of its values.

Used for the document adapters the server validated (``serving.adapter_cache``), those
vLLM's worker read for merge manifests (:mod:`prag_vllm.vllm_plugin.merged`) and the
float32 copies of LoRA slots (:mod:`prag_vllm.vllm_plugin.punica`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ByteLRU(Generic[K, V]):
    """Values with a size in bytes; once the sizes sum past :attr:`max_bytes`, the least
    recently used go first. A value larger than the whole bound is not kept. Thread-safe."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        """Bound of the sizes' sum (0: keep nothing)."""
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        """The value, now the most recently used; None if absent."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: K, value: V, nbytes: int) -> V:
        """Keep ``value`` under ``key`` (replacing what was there); returns ``value``."""
        with self._lock:
            self._drop(key)
            self._insert(key, value, nbytes)
        return value

    def setdefault(self, key: K, value: V, nbytes: int) -> V:
        """The value under ``key`` if there is one (another thread got there first), else
        keep ``value`` and return it."""
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
                return item[0]
            self._insert(key, value, nbytes)
        return value

    def pop(self, key: K) -> V | None:
        with self._lock:
            item = self._drop(key)
        return None if item is None else item[0]

    def fits(self, nbytes: int) -> bool:
        """``nbytes`` more would be kept without evicting anything."""
        with self._lock:
            return self._bytes + nbytes <= self.max_bytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[K]:
        """Keys, least recently used first (a snapshot)."""
        with self._lock:
            return iter(list(self._items))

    def _drop(self, key: K) -> tuple[V, int] | None:
        item = self._items.pop(key, None)
        if item is not None:
            self._bytes -= item[1]
        return item

    def _insert(self, key: K, value: V, nbytes: int) -> None:
        if nbytes > self.max_bytes:
            return
        self._items[key] = (value, nbytes)
        self._bytes += nbytes
        while self._bytes > self.max_bytes:
            _, (_, n) = self._items.popitem(last=False)
            self._bytes -= n
