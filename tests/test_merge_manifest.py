"""Merge manifests: the worker builds exactly the merged adapter the server would have written."""

from __future__ import annotations

import asyncio
import json
import os
import shutil

import pytest
import torch

from conftest import random_adapter
from prag_vllm.adapters import AdapterStore, LoraAdapter
from prag_vllm.errors import AdapterError
from prag_vllm.merge import MANIFEST_FILE, merge_adapters, merge_from_manifest, write_merge_manifest
from prag_vllm.vllm_plugin.merged import PartCache, cache_bytes_from_env


@pytest.fixture
def store(tiny_model_dir, tmp_path):
    store = AdapterStore(tmp_path / "store")
    for i in range(3):
        ad = random_adapter(tiny_model_dir, seed=10 + i, rank=2)
        ad.weights = {m: (a.bfloat16(), b.bfloat16()) for m, (a, b) in ad.weights.items()}
        store.save(f"d{i}", ad)
    return store


def _same(x: LoraAdapter, y: LoraAdapter) -> None:
    assert x.r == y.r and x.scaling == y.scaling and set(x.weights) == set(y.weights)
    for m, (a, b) in x.weights.items():
        assert a.dtype == y.weights[m][0].dtype and torch.equal(a, y.weights[m][0]) and torch.equal(b, y.weights[m][1])


def test_manifest_merges_to_the_file_the_server_writes(store, tmp_path):
    ads = [store.load(f"d{i}") for i in range(3)]
    nbytes = write_merge_manifest(ads, tmp_path / "m", ["d0", "d1", "d2"])
    assert nbytes == sum(f.stat().st_size for f in (tmp_path / "m").iterdir())
    assert not (tmp_path / "m" / "adapter_model.safetensors").exists()
    config = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert config["r"] == 6 and config["lora_alpha"] == 6

    cache = PartCache(64 << 20)
    got = merge_from_manifest(tmp_path / "m", cache.load)
    merge_adapters(ads, fold_scaling=True).save(tmp_path / "f", scratch=True)
    _same(got, LoraAdapter.load(tmp_path / "f"))  # bit for bit what the file path gives vLLM
    assert (cache.misses, cache.hits, cache.hashed) == (3, 0, 0)  # the files the server read: not hashed again
    _same(merge_from_manifest(tmp_path / "m", cache.load), got)
    assert cache.hits == 3 and len(cache) == 3


def test_replaced_document_adapter_is_hashed_and_refused_if_different(store, tiny_model_dir, tmp_path):
    ads = [store.load(f"d{i}") for i in range(2)]
    write_merge_manifest(ads, tmp_path / "m", ["d0", "d1"])
    # same bytes in a new file (a copy renamed into place): hashed, accepted
    w = store.path("d0") / "adapter_model.safetensors"
    shutil.copyfile(w, tmp_path / "copy")
    os.replace(tmp_path / "copy", w)
    cache = PartCache(64 << 20)
    merge_from_manifest(tmp_path / "m", cache.load)
    assert cache.hashed == 1
    # different bytes (the document was trained again): refused, nothing cached for it
    store.save("d1", random_adapter(tiny_model_dir, seed=99, rank=2))
    cache = PartCache(64 << 20)
    with pytest.raises(AdapterError, match="changed after the server validated it"):
        merge_from_manifest(tmp_path / "m", cache.load)
    assert len(cache) == 1


def test_bad_manifests_are_clear_errors(store, tmp_path):
    write_merge_manifest([store.load("d0")], tmp_path / "m", ["d0"])
    path = tmp_path / "m" / MANIFEST_FILE
    good = json.loads(path.read_text())
    for bad, match in (({**good, "format": "other/9"}, "format"), ({**good, "r": 5}, "add up"),
                       ({**good, "parts": [{"path": "x"}]}, "unreadable merge manifest")):
        path.write_text(json.dumps(bad))
        with pytest.raises(AdapterError, match=match):
            merge_from_manifest(tmp_path / "m", PartCache(1 << 20).load)
    with pytest.raises(AdapterError, match="read from files"):
        write_merge_manifest([random_adapter_of(store)], tmp_path / "n", ["x"])


def random_adapter_of(store) -> LoraAdapter:
    ad = store.load("d0")
    return LoraAdapter(r=ad.r, alpha=ad.alpha, weights=ad.weights)


def test_part_cache_is_bounded_and_its_setting_checked(store, monkeypatch):
    sources = [store.load(f"d{i}").source for i in range(3)]
    one = sum(a.nbytes + b.nbytes for a, b in PartCache(1 << 30).load(sources[0], 2, 32.0).weights.values())
    cache = PartCache(2 * one)
    for s in sources:
        cache.load(s, 2, 32.0)
    assert len(cache) == 2 and cache.nbytes == 2 * one  # bounded by the tensors it holds
    monkeypatch.setenv("PRAG_WORKER_ADAPTER_CACHE_MB", "lots")
    with pytest.raises(ValueError, match="PRAG_WORKER_ADAPTER_CACHE_MB"):
        cache_bytes_from_env()


def test_server_lru_writes_manifests_and_drops_entries_vllm_cannot_load(store, tiny_model_dir, tmp_path):
    from transformers import AutoConfig

    from prag_vllm.ffn import ffn_shapes
    from serving.adapters.doc_cache import DocAdapterCache
    from serving.adapters.merged_cache import MergedAdapterLRU

    docs = DocAdapterCache(store, ffn_shapes(AutoConfig.from_pretrained(tiny_model_dir)), 8, keep_tensors=False)
    loaded, fail = [], [True]

    async def load(entry):
        if fail[0]:
            raise RuntimeError("vLLM could not load it")
        loaded.append(entry.lora_id)

    lru = MergedAdapterLRU(docs, tmp_path / "merged", 8, 1 << 30, worker_merge=True, load=load)

    async def run():
        with pytest.raises(RuntimeError):
            await lru.acquire(["d0", "d1"])
        assert lru.size == 0 and not list((tmp_path / "merged").iterdir())  # nothing half-made left behind
        fail[0] = False
        return await lru.acquire(["d0", "d1"])

    entry, _, hit = asyncio.run(run())
    assert not hit and loaded == [entry.lora_id] and (entry.path / MANIFEST_FILE).is_file()
    assert entry.rank == 4 and entry.load_seconds > 0
    assert len(docs) == 2 and docs.nbytes < 8192 and docs.get("d0").weights == {}  # validated, tensors not kept
    _same(merge_from_manifest(entry.path, PartCache(64 << 20).load),
          merge_adapters([store.load("d0"), store.load("d1")], fold_scaling=True))
    lru.release(entry)

    async def again():  # a cached manifest is loaded again; if that fails, the entry is dropped
        e, _, hit = await lru.acquire(["d1", "d0"])
        assert hit and e is entry and loaded == [entry.lora_id] * 2
        lru.release(e)
        fail[0] = True
        with pytest.raises(RuntimeError):
            await lru.acquire(["d0", "d1"])
        assert lru.size == 0 and entry.refs == 0 and not entry.path.exists()

    asyncio.run(again())


def test_part_cache_preload_fills_without_evicting_and_skips_bad_parts(store, tiny_model_dir, tmp_path):
    """What vLLM's worker runs for the server's preload (``prag_preload_parts``): parts are
    read until the next would not fit; a part whose file changed is skipped, not fatal."""
    from prag_vllm.vllm_plugin.merged import preload_parts

    ads = [store.load(f"d{i}") for i in range(3)]
    parts = [(a.source, a.r, a.alpha) for a in ads]
    one = ads[0].source.size
    cache = PartCache(2 * one)
    assert cache.preload(parts) == 2 and len(cache) == 2 and cache.misses == 2
    assert cache.preload(parts[:2]) == 2 and cache.misses == 2  # already there: nothing read again
    store.save("d1", random_adapter(tiny_model_dir, seed=77, rank=2))  # replaced after the server validated it
    fresh = PartCache(8 * one)
    assert fresh.preload(parts) == 2 and len(fresh) == 2  # d0 and d2
    with pytest.raises(ValueError, match="bad part list"):
        preload_parts(None, [["only-a-path"]])


def test_part_cache_keeps_factors_in_the_slots_dtype_with_b_as_words(store, tmp_path):
    """A float32 engine's worker keeps the bf16 documents converted once (exact: bf16 ->
    float32), B row-major with its machine-word view; a change of dtype drops what was cached."""
    from prag_vllm.vllm_plugin.parts import as_words

    ads = [store.load(f"d{i}") for i in range(3)]
    write_merge_manifest(ads, tmp_path / "m", ["d0", "d1", "d2"])
    cache = PartCache(64 << 20)
    cache.keep_as(torch.float32)
    adapter, words, stacks = cache.document(ads[0].source, 2, 32.0)
    want = merge_adapters([ads[0]], fold_scaling=True)
    assert set(words) == set(adapter.weights)
    # every layer of a projection kind in one tensor (for the slot pools); the factors are views of it
    assert sorted(stacks) == ["down_proj", "gate_proj", "up_proj"]
    for s in stacks.values():
        assert s.a.shape[0] == len(s.names) == s.b.shape[0] and s.words.dtype == torch.int64
        for i, m in enumerate(s.names):
            a, b = adapter.weights[m]
            assert a.data_ptr() == s.a[i].data_ptr() and b.data_ptr() == s.b[i].data_ptr()
    for m, (a, b) in adapter.weights.items():
        assert a.dtype == b.dtype == torch.float32 and b.is_contiguous()
        assert torch.equal(a, want.weights[m][0].float()) and torch.equal(b, want.weights[m][1].float())
        assert words[m].dtype == torch.int64 and words[m].data_ptr() == b.data_ptr()
        assert torch.equal(words[m], as_words(b))
    assert cache.nbytes == sum(a.nbytes + b.nbytes for a, b in adapter.weights.values())
    got = merge_from_manifest(tmp_path / "m", cache.load)  # the same merge, now in float32
    _same(got, LoraAdapter(r=6, alpha=6.0, weights={m: (a.float(), b.float()) for m, (a, b) in
                                                    merge_adapters(ads, fold_scaling=True).weights.items()}))
    cache.keep_as(torch.float32)
    assert len(cache) == 3
    cache.keep_as(torch.bfloat16)
    assert len(cache) == 0 and cache.document(ads[0].source, 2, 32.0)[0].weights[m][0].dtype == torch.bfloat16


def test_mean_policy_in_the_server_lru_and_the_worker(store, tiny_model_dir, tmp_path):
    """``merge_policy="mean"`` in the server: the file it writes and the manifest the worker merges
    are both ``merge_adapters(..., policy="mean")``; the worker's part cache folds one document
    per alpha, so mean and sum merges sharing it do not mix."""
    from transformers import AutoConfig

    from prag_vllm.ffn import ffn_shapes
    from serving.adapters.doc_cache import DocAdapterCache
    from serving.adapters.merged_cache import MergedAdapterLRU

    shapes = ffn_shapes(AutoConfig.from_pretrained(tiny_model_dir))
    ids = ["d0", "d1", "d2"]
    mean = merge_adapters([store.load(i) for i in ids], fold_scaling=True, policy="mean")
    total = merge_adapters([store.load(i) for i in ids[:2]], fold_scaling=True)
    cache = PartCache(64 << 20)
    for worker in (False, True):
        docs = DocAdapterCache(store, shapes, 8, keep_tensors=not worker)
        lru = MergedAdapterLRU(docs, tmp_path / f"merged{worker}", 8, 1 << 30, worker_merge=worker, policy="mean")
        summed = MergedAdapterLRU(docs, tmp_path / f"summed{worker}", 8, 1 << 30, worker_merge=worker)
        (entry, _, _), (other, _, _) = asyncio.run(lru.acquire(ids)), asyncio.run(summed.acquire(ids[:2]))
        if worker:
            _same(merge_from_manifest(entry.path, cache.load), mean)
            _same(merge_from_manifest(other.path, cache.load), total)
        else:
            _same(LoraAdapter.load(entry.path), mean)
            _same(LoraAdapter.load(other.path), total)
    assert len(cache) == 5  # d0 and d1 each folded twice: at alpha / 3 and at alpha
    with pytest.raises(Exception, match="unknown merge policy"):
        MergedAdapterLRU(docs, tmp_path / "x", 8, 1 << 30, policy="median")
