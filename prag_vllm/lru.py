"""A least-recently-used map bounded by the bytes of its values (and optionally their count).

Used for the document adapters the server validated (:mod:`serving.adapters.doc_cache`),
the merged adapters it wrote (:mod:`serving.adapters.merged_cache`: pinned while in use,
deleted when evicted), those vLLM's worker read for merge manifests
(:mod:`prag_vllm.vllm_plugin.merged`) and the float32 copies of LoRA slots
(:mod:`prag_vllm.vllm_plugin.punica`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ByteLRU(Generic[K, V]):
    """Values with a size in bytes; once the sizes sum past :attr:`max_bytes`, the least
    recently used go first. A value larger than the whole bound is not kept (unless pinned).
    Thread-safe."""

    def __init__(self, max_bytes: int, *, max_entries: int | None = None,
                 pinned: Callable[[V], bool] | None = None, on_evict: Callable[[K, V], None] | None = None):
        self.max_bytes = max_bytes
        """Bound of the sizes' sum (0: keep nothing)."""
        self.max_entries = max_entries
        """Bound of the number of values (None: no bound)."""
        self.pinned = pinned
        """A value for which this is true is never evicted (the map stays over its bounds
        until :meth:`evict` is called once it is not)."""
        self.on_evict = on_evict
        """Called with each evicted key and value (outside the lock); not for :meth:`pop`,
        :meth:`put`'s replacement or :meth:`clear`."""
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

    def peek(self, key: K) -> V | None:
        """The value, its recency unchanged; None if absent."""
        with self._lock:
            item = self._items.get(key)
        return None if item is None else item[0]

    def put(self, key: K, value: V, nbytes: int) -> V:
        """Keep ``value`` under ``key`` (replacing what was there); returns ``value``."""
        with self._lock:
            self._drop(key)
            victims = self._insert(key, value, nbytes)
        self._evicted(victims)
        return value

    def setdefault(self, key: K, value: V, nbytes: int) -> V:
        """The value under ``key`` if there is one (another thread got there first), else
        keep ``value`` and return it."""
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
                return item[0]
            victims = self._insert(key, value, nbytes)
        self._evicted(victims)
        return value

    def evict(self) -> None:
        """Evict down to the bounds (after a value stopped being pinned)."""
        with self._lock:
            victims = self._trim()
        self._evicted(victims)

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

    def values(self) -> list[V]:
        """Values, least recently used first (a snapshot)."""
        with self._lock:
            return [v for v, _ in self._items.values()]

    def _drop(self, key: K) -> tuple[V, int] | None:
        item = self._items.pop(key, None)
        if item is not None:
            self._bytes -= item[1]
        return item

    def _is_pinned(self, value: V) -> bool:
        return self.pinned is not None and self.pinned(value)

    def _insert(self, key: K, value: V, nbytes: int) -> list[tuple[K, V]]:
        if nbytes > self.max_bytes and not self._is_pinned(value):
            return []
        self._items[key] = (value, nbytes)
        self._bytes += nbytes
        return self._trim()

    def _trim(self) -> list[tuple[K, V]]:
        """Drop the least recently used unpinned values while over a bound; returns them."""
        victims = []
        while self._bytes > self.max_bytes or (self.max_entries is not None and len(self._items) > self.max_entries):
            key = next((k for k, (v, _) in self._items.items() if not self._is_pinned(v)), None)
            if key is None:  # everything pinned: over the bound until some is not
                break
            value, n = self._items.pop(key)
            self._bytes -= n
            victims.append((key, value))
        return victims

    def _evicted(self, victims: list[tuple[K, V]]) -> None:
        if self.on_evict is not None:
            for key, value in victims:
                self.on_evict(key, value)
