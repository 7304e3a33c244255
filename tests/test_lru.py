"""The byte-bounded LRU behind the three adapter caches (server documents, worker
documents, float32 slot copies)."""

from __future__ import annotations

import threading

import pytest

from prag_vllm.lru import ByteLRU
from prag_vllm.vllm_plugin.settings import BUSY_LOOP_S, F32_CACHE_MB


def test_least_recently_used_go_first_once_over_the_bound():
    lru: ByteLRU[str, int] = ByteLRU(10)
    for i, key in enumerate("abc"):
        lru.put(key, i, 3)
    assert lru.get("a") == 0  # a is now the most recently used
    lru.put("d", 3, 3)  # 12 > 10: b goes
    assert list(lru) == ["c", "a", "d"] and lru.nbytes == 9
    lru.put("e", 4, 7)  # 16 > 10: c, then a go
    assert list(lru) == ["d", "e"] and lru.nbytes == 10 and lru.get("b") is None


def test_put_replaces_and_setdefault_keeps_the_first():
    lru: ByteLRU[str, str] = ByteLRU(100)
    lru.put("k", "old", 40)
    lru.put("k", "new", 10)
    assert lru.get("k") == "new" and lru.nbytes == 10 and len(lru) == 1
    assert lru.setdefault("k", "other", 50) == "new" and lru.nbytes == 10
    assert lru.setdefault("j", "first", 5) == "first" and lru.nbytes == 15
    assert lru.pop("k") == "new" and lru.pop("k") is None and lru.nbytes == 5


def test_a_value_larger_than_the_bound_is_returned_not_kept():
    lru: ByteLRU[str, str] = ByteLRU(10)
    lru.put("small", "s", 4)
    assert lru.setdefault("big", "b", 11) == "b"
    assert "big" not in lru and list(lru) == ["small"]  # nothing evicted for it either
    assert lru.fits(6) and not lru.fits(7)
    nothing: ByteLRU[str, str] = ByteLRU(0)
    nothing.put("x", "x", 1)
    assert len(nothing) == 0 and nothing.nbytes == 0


def test_concurrent_writers_keep_the_count_exact():
    lru: ByteLRU[int, int] = ByteLRU(1000)

    def write(offset: int) -> None:
        for i in range(2000):
            key = (offset + i) % 300
            lru.put(key, key, 1 + key % 7) if i % 2 else lru.setdefault(key, key, 1 + key % 7)
            lru.get((key * 7) % 300)

    threads = [threading.Thread(target=write, args=(k * 37,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert lru.nbytes == sum(1 + k % 7 for k in lru) <= 1000


def test_mib_settings_in_bytes(monkeypatch):
    monkeypatch.setenv("PRAG_F32_CACHE_MB", "1.5")
    assert F32_CACHE_MB.bytes() == 3 << 19
    monkeypatch.setenv("PRAG_F32_CACHE_MB", "-1")
    with pytest.raises(ValueError, match="PRAG_F32_CACHE_MB must be a number of MiB >= 0"):
        F32_CACHE_MB.bytes()
    with pytest.raises(TypeError, match="seconds"):
        BUSY_LOOP_S.bytes()


def test_entry_bound_pinning_and_eviction_callback():
    """The merged-adapter cache's use: a count bound too, pinned values stay (even past the
    bounds, even when larger than the byte bound) until :meth:`evict` after unpinning."""
    pinned: set[str] = set()
    evicted: list[str] = []
    lru: ByteLRU[str, str] = ByteLRU(10, max_entries=2, pinned=lambda v: v in pinned,
                                     on_evict=lambda k, v: evicted.append(k))
    pinned |= {"a", "b", "c"}
    for key in "abc":
        lru.put(key, key, 1)
    assert list(lru) == ["a", "b", "c"] and not evicted  # all pinned: over the bound for now
    pinned.discard("b")
    lru.evict()
    assert list(lru) == ["a", "c"] and evicted == ["b"]
    pinned.add("big")
    lru.put("big", "big", 50)  # pinned: kept though larger than the whole bound
    assert "big" in lru and lru.nbytes == 52 and lru.peek("a") == "a" and list(lru)[0] == "a"
    pinned.clear()
    lru.evict()
    assert evicted == ["b", "a", "c", "big"] and len(lru) == 0 and lru.nbytes == 0
    lru.put("x", "x", 1)
    assert lru.pop("x") == "x" and evicted[-1] == "big"  # popped, not evicted
