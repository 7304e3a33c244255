"""The server's adapter caches (no vLLM): validation, LRU bounds, pinning, single flight; and its config."""

from __future__ import annotations

import argparse
import asyncio

import pytest

from conftest import random_adapter
from prag_vllm.adapters import AdapterStore
from prag_vllm.errors import InputError
from prag_vllm.merge import merge_adapters


@pytest.fixture()
def caches(tmp_path, tiny_model_dir):
    from transformers import AutoConfig

    from prag_vllm.ffn import ffn_shapes
    from serving.adapters.doc_cache import DocAdapterCache
    from serving.adapters.merged_cache import MergedAdapterLRU

    store = AdapterStore(tmp_path / "store")
    for i in range(6):
        store.save(f"d{i}", random_adapter(tiny_model_dir, seed=i))
    docs = DocAdapterCache(store, ffn_shapes(AutoConfig.from_pretrained(tiny_model_dir)), max_rank=8)
    evicted = []

    def make(max_entries=3, max_bytes=1 << 30):
        return MergedAdapterLRU(docs, tmp_path / "merged", max_entries, max_bytes, on_evict=evicted.append)

    return store, docs, make, evicted


def test_merge_is_cached_and_exact(caches):
    from prag_vllm.adapters import LoraAdapter

    store, docs, make, _ = caches
    lru = make()

    async def run():
        e1, left, hit1 = await lru.acquire(["d2", "d1"])
        e2, _, hit2 = await lru.acquire(["d1", "d2"])
        return e1, e2, left, hit1, hit2

    e1, e2, left, hit1, hit2 = asyncio.run(run())
    assert e1 is e2 and not hit1 and hit2 and left == [] and e1.refs == 2
    got = LoraAdapter.load(e1.path)
    want = merge_adapters([store.load("d1"), store.load("d2")])
    for m in want.weights:
        assert (got.delta(m) - want.delta(m)).abs().max() < 1e-2  # bf16 on disk


def test_lru_bounds_pinning_and_eviction(caches):
    _, _, make, evicted = caches
    lru = make(max_entries=2)

    async def run():
        a, _, _ = await lru.acquire(["d0"])
        b, _, _ = await lru.acquire(["d1"])
        c, _, _ = await lru.acquire(["d2"])  # all pinned: over the bound for now
        assert lru.size == 3 and not evicted
        lru.release(a)  # a is least recently used and free -> evicted
        assert [e.key for e in evicted] == [a.key] and not a.path.exists()
        lru.release(b)
        lru.release(c)
        assert lru.size == 2
        d, _, hit = await lru.acquire(["d0"])  # rebuilt under a new vLLM id
        assert not hit and d.lora_id not in {a.lora_id, b.lora_id, c.lora_id}

    asyncio.run(run())


def test_byte_bound(caches):
    _, _, make, evicted = caches
    lru = make(max_entries=100, max_bytes=1)

    async def run():
        for i in range(3):
            e, _, _ = await lru.acquire([f"d{i}"])
            lru.release(e)
        assert lru.size == 0 and len(evicted) == 3

    asyncio.run(run())


def test_single_flight(caches):
    _, _, make, _ = caches
    lru = make()

    async def run():
        results = await asyncio.gather(*(lru.acquire(["d3", "d4"]) for _ in range(8)))
        return results

    results = asyncio.run(run())
    assert lru.misses == 1 and lru.hits == 7
    assert len({id(e) for e, _, _ in results}) == 1 and results[0][0].refs == 8


def test_corrupt_and_misfit_adapters_are_rejected(caches, tmp_path, test_model_dir):
    store, docs, make, _ = caches
    weights = store.path("d5") / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # truncated
    store.save("big", random_adapter(test_model_dir, seed=1))  # another model's shapes
    lru = make()

    async def run():
        return await lru.acquire(["d0", "d5", "big"])

    entry, left_out, _ = asyncio.run(run())
    assert entry.doc_ids == ("d0",) and sorted(left_out) == ["big", "d5"]
    assert set(docs.rejected) == {"d5", "big"} and not docs.has("d5")


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def _rewrite_meta(path, **changes):
    import json

    meta = json.loads(path.read_text())
    meta.update(changes)
    for k in [k for k, v in changes.items() if v is None]:
        del meta[k]
    path.write_text(json.dumps(meta))


CORRUPTIONS = {
    "bit flip": lambda d: _flip_byte(d / "adapter_model.safetensors"),
    "truncated": lambda d: (d / "adapter_model.safetensors").write_bytes((d / "adapter_model.safetensors").read_bytes()[:100]),
    "empty weights": lambda d: (d / "adapter_model.safetensors").write_bytes(b""),
    "bad config": lambda d: (d / "adapter_config.json").write_text("{not json"),
    "config without r": lambda d: (d / "adapter_config.json").write_text('{"lora_alpha": 32}'),
    "missing config": lambda d: (d / "adapter_config.json").unlink(),
    "no checksum": lambda d: _rewrite_meta(d / "prag_meta.json", sha256=None),
    "wrong base model": lambda d: _rewrite_meta(d / "prag_meta.json", base_model_id="0" * 32),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_each_corruption_is_rejected(caches, kind):
    store, docs, make, _ = caches
    docs.model_id = store.load("d1").meta["base_model_id"]
    assert docs.model_id  # stamped at save time
    CORRUPTIONS[kind](store.path("d1"))
    assert docs.get("d1") is None and "d1" in docs.rejected
    entry, left_out, _ = asyncio.run(make().acquire(["d0", "d1"]))
    assert entry.doc_ids == ("d0",) and left_out == ["d1"]


def test_rank_above_the_engine_limit_is_rejected(tmp_path, tiny_model_dir):
    from transformers import AutoConfig

    from prag_vllm.ffn import ffn_shapes
    from serving.adapters.doc_cache import DocAdapterCache

    store = AdapterStore(tmp_path / "store")
    store.save("big", random_adapter(tiny_model_dir, seed=0, rank=16))
    docs = DocAdapterCache(store, ffn_shapes(AutoConfig.from_pretrained(tiny_model_dir)), max_rank=8)
    assert docs.get("big") is None and "rank 16" in docs.rejected["big"]


def test_config_file_and_flags(tmp_path):
    from serving.config import add_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    toml = tmp_path / "server.toml"
    toml.write_text('port = 9001\nmax_top_k = 5\napi_key = "k"\n')
    cfg = config_from_args(p.parse_args(["--config", str(toml), "--port", "9002"]))
    assert (cfg.port, cfg.max_top_k, cfg.api_key) == (9002, 5, "k")
    toml.write_text("prot = 9001\n")
    with pytest.raises(InputError, match="unknown setting"):
        config_from_args(p.parse_args(["--config", str(toml)]))
    toml.write_text('port = "x"\n')
    with pytest.raises(InputError, match="integer"):
        config_from_args(p.parse_args(["--config", str(toml)]))
    with pytest.raises(InputError, match="default_mode|unknown mode"):
        config_from_args(p.parse_args(["--default-mode", "psychic"]))
    with pytest.raises(InputError, match="corpus file not found"):
        config_from_args(p.parse_args(["--corpus", str(tmp_path / "nope.jsonl")]))
    assert config_from_args(p.parse_args(["--enable-lora", "0"])).enable_lora == 0
    with pytest.raises(InputError, match="enable_lora must be 0 or 1"):
        config_from_args(p.parse_args(["--enable-lora", "2"]))
    assert config_from_args(p.parse_args(["--enable-prefix-caching", "0"])).enable_prefix_caching == 0
    with pytest.raises(InputError, match="preload_adapters must be 0 or 1"):
        config_from_args(p.parse_args(["--preload-adapters", "3"]))
    assert config_from_args(p.parse_args(["--merge-policy", "mean"])).merge_policy == "mean"
    with pytest.raises(InputError, match="unknown merge policy"):
        config_from_args(p.parse_args(["--merge-policy", "median"]))


def test_parallel_reads_and_preload(caches, tmp_path):
    """get_many reads cold adapters in parallel with the same result (bad ones still None);
    preload fills the cache up to its byte bound, then stops."""
    from serving.adapters.doc_cache import DocAdapterCache
    from serving.adapters.preload import preload

    store, docs, make, _ = caches
    (store.path("d5") / "adapter_model.safetensors").write_bytes(b"garbage")
    got = docs.get_many(["d0", "d1", "d5", "d2", "nope"])
    assert [a is None for a in got] == [False, False, True, False, True]
    assert len(docs) == 3 and "d5" in docs.rejected
    for doc_id, a in zip(["d0", "d1", "d2"], [got[0], got[1], got[3]]):
        want = store.load(doc_id)
        assert all((a.weights[m][1] == want.weights[m][1]).all() for m in want.weights)
    assert docs.nbytes == 3 * (docs.nbytes // 3)  # each counted once

    one = docs.nbytes // 3
    small = DocAdapterCache(store, docs.shapes, max_rank=8, max_bytes=int(2.5 * one))
    preload(small, [f"d{i}" for i in range(5)], background=True).join(timeout=60)
    assert list(small._items) == ["d0", "d1"]  # stopped when full, nothing read only to be evicted


def test_engine_without_lora_puts_every_document_in_context(tiny_model_dir, tmp_path):
    """enable_lora = 0: no document is chosen as a parameter, whatever adapters exist."""
    from types import SimpleNamespace

    from transformers import AutoConfig

    from prag_vllm.corpus import Document
    from prag_vllm.ffn import ffn_shapes
    from prag_vllm.generate import EngineConfig
    from serving.adapters.doc_cache import DocAdapterCache
    from serving.service import RAGService

    store = AdapterStore(tmp_path / "store")
    store.save("d1", random_adapter(tiny_model_dir, seed=1))
    docs = DocAdapterCache(store, ffn_shapes(AutoConfig.from_pretrained(tiny_model_dir)), max_rank=8)
    service = RAGService.__new__(RAGService)
    service.docs, service.max_lora_rank = docs, 8
    d1 = Document(id="d1", title="D1", text="one")
    for enable, chosen in ((True, ["d1"]), (False, [])):
        service.engine = SimpleNamespace(settings=EngineConfig(model=str(tiny_model_dir), enable_lora=enable))
        assert service._select([d1]) == (chosen, [])


def test_preload_hands_validated_adapters_to_the_worker_in_batches(caches):
    """--preload-adapters with worker merge: validated adapters go to vLLM's worker a batch at
    a time; once the worker is full (or fails) nothing more is sent; /health shows progress."""
    from serving.adapters.doc_cache import DocAdapterCache
    from serving.adapters.preload import preload

    store, docs, _, _ = caches
    ids = [f"d{i}" for i in range(5)]
    sent: list[list[str]] = []

    def worker(adapters):
        sent.append([a.source.path for a in adapters])
        return sum(map(len, sent)), len(sent) == 2  # full after the second batch

    cache = DocAdapterCache(store, docs.shapes, max_rank=8, keep_tensors=False)
    preload(cache, ids, on_batch=worker, batch=2)  # three batches, but the worker is full after two
    assert [len(b) for b in sent] == [2, 2] and cache.preload_state == {"running": False, "documents": 5,
                                                                         "worker_documents": 4}
    assert sent[0][0] == str((store.path("d0") / "adapter_model.safetensors").resolve())

    def broken(adapters):
        raise RuntimeError("engine gone")

    other = DocAdapterCache(store, docs.shapes, max_rank=8, keep_tensors=False)
    preload(other, ids, on_batch=broken, batch=2)  # the server keeps serving: only logged
    assert other.preload_state["documents"] == 5 and other.preload_state["worker_documents"] == 0
    plain = DocAdapterCache(store, docs.shapes, max_rank=8)
    preload(plain, ids)
    assert plain.preload_state["worker_documents"] is None
