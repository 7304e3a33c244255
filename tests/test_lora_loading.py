"""The plugin's faster adapter loading (vllm_plugin/loading.py) loads exactly what vLLM's own path loads."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from conftest import random_adapter

pytest.importorskip("vllm")


def _load(lora_model, path):
    from vllm.lora.peft_helper import PEFTHelper

    helper = PEFTHelper.from_local_dir(str(path), 512)
    return lora_model.LoRAModel.from_local_checkpoint(
        str(path), {"gate_proj", "up_proj", "down_proj"}, peft_helper=helper, lora_model_id=1, device="cpu",
        dtype=None)


def test_whole_file_reads_and_memoized_names_load_the_same_adapter(tiny_model_dir, tmp_path, monkeypatch):
    import safetensors
    from vllm.lora import lora_model

    from prag_vllm.vllm_plugin import loading

    path = random_adapter(tiny_model_dir, seed=3, rank=4).save(tmp_path / "a", scratch=True)
    # vLLM's own path (the plugin may already be installed in this process; restored after the test)
    monkeypatch.setattr(lora_model, "safetensors", safetensors)
    monkeypatch.setattr(lora_model, "_prag_loading", False, raising=False)
    original = lora_model.parse_fine_tuned_lora_name
    while hasattr(original, "__wrapped__"):
        original = original.__wrapped__
    monkeypatch.setattr(lora_model, "parse_fine_tuned_lora_name", original)
    want = _load(lora_model, path)

    loading.install()
    assert isinstance(lora_model.safetensors, loading._SafetensorsShim)
    got = _load(lora_model, path)
    got_again = _load(lora_model, path)
    assert lora_model.parse_fine_tuned_lora_name.cache_info().hits > 0
    assert set(got.loras) == set(want.loras) and len(want.loras) == 6  # 2 layers x 3 projections
    for name, w in want.loras.items():
        for g in (got.loras[name], got_again.loras[name]):
            assert g.rank == w.rank == 4 and g.lora_alpha == w.lora_alpha
            assert g.lora_a.dtype == w.lora_a.dtype and (g.lora_a == w.lora_a).all() and (g.lora_b == w.lora_b).all()

    # files over the limit keep vLLM's memory-mapped reads
    monkeypatch.setattr(loading, "MAX_WHOLE_READ", 10)
    assert not isinstance(lora_model.safetensors.safe_open(str(path / "adapter_model.safetensors")),
                          loading.WholeFileSafeOpen)


def test_memoized_parser_keys_on_the_mapper():
    from prag_vllm.vllm_plugin import loading
    from prag_vllm.vllm_plugin.loading import memoized_name_parser

    calls = []

    def parse(name, mapper=None):
        calls.append((name, mapper))
        return (name.upper() if mapper is None else mapper + name), True

    p = memoized_name_parser(parse)
    assert p("a") == ("A", True) and p("a") == ("A", True)
    assert p("a", "m:") == ("m:a", True) and p("a", "n:") == ("n:a", True)
    assert len(calls) == 3
    # vLLM builds a new, equal mapper for every adapter: still one parse per name, and the
    # objects it remembers stay bounded (it used to keep every mapper: a leak per add_lora)
    for _ in range(50):
        assert p("a", Mapper({"m": "x"})) == ("m:a", True)
    assert len(calls) == 4 and len(p.recent) <= loading.RECENT_MAPPERS
    assert p("a", Mapper({"m": "y"})) == ("m:a", True) and len(calls) == 5  # other content: parsed again


@dataclass
class Mapper:
    """Like vLLM's WeightsMapper: a dataclass, equal by content, unhashable."""

    prefix: dict

    def __add__(self, name):
        return "m:" + name


def test_idle_spinning_is_shortened(monkeypatch, tmp_path):
    """vllm_plugin/idle.py: vLLM's shared-memory readers spin for PRAG_VLLM_BUSY_LOOP_S, not 1 s."""
    import zmq
    from vllm.distributed.device_communicators import shm_broadcast

    from prag_vllm.vllm_plugin import idle

    monkeypatch.setattr(shm_broadcast.SpinCondition, "_prag_idle", False, raising=False)
    init = shm_broadcast.SpinCondition.__init__
    while hasattr(init, "__wrapped__"):  # the plugin may already be installed in this process
        init = init.__wrapped__
    monkeypatch.setattr(shm_broadcast.SpinCondition, "__init__", init)
    monkeypatch.setattr(shm_broadcast, "SHM_READER_RECHECK_INTERVAL_MS", 5000)  # vLLM's own
    ctx = zmq.Context()
    try:
        addr = f"ipc://{tmp_path}/notify"
        assert shm_broadcast.SpinCondition(True, ctx, addr).busy_loop_s == 1  # vLLM's own
        monkeypatch.setenv("PRAG_VLLM_BUSY_LOOP_S", "0.004")
        idle.install()
        reader = shm_broadcast.SpinCondition(True, ctx, addr)
        assert reader.busy_loop_s == 0.004
        assert shm_broadcast.SpinCondition(True, ctx, addr, busy_loop_s=0.5).busy_loop_s == 0.5  # explicit wins
        # a sleeping reader re-checks its queue every RECHECK_MS, so a lost ping costs that, not 5 s
        wait = shm_broadcast.MessageQueue.ReadTimeoutWithWarnings(timeout=None, should_warn=False)
        assert wait.timeout_ms() == idle.RECHECK_MS == 20
    finally:
        ctx.destroy(linger=0)
    monkeypatch.setenv("PRAG_VLLM_BUSY_LOOP_S", "-1")
    with pytest.raises(ValueError, match=">= 0"):
        idle.busy_loop_seconds()
    monkeypatch.delenv("PRAG_VLLM_BUSY_LOOP_S")
    assert idle.busy_loop_seconds() == idle.DEFAULT_BUSY_LOOP_S


def test_merge_manifest_loads_the_same_lora_model_as_the_merged_file(tiny_model_dir, tmp_path):
    """vllm_plugin/merged.py: vLLM's loader given a manifest directory builds the LoRAModel
    it builds from the merged tensors file (the server's path without the plugin), its
    factors kept as the documents' parts (vllm_plugin/parts.py)."""
    from vllm.lora import lora_model

    from prag_vllm.adapters import AdapterStore
    from prag_vllm.merge import merge_adapters, write_merge_manifest
    from prag_vllm.vllm_plugin import merged
    from prag_vllm.vllm_plugin.parts import RankParts

    store = AdapterStore(tmp_path / "store")
    for i in range(3):
        store.save(f"d{i}", random_adapter(tiny_model_dir, seed=20 + i, rank=2))
    ads = [store.load(f"d{i}") for i in range(3)]
    merge_adapters(ads, fold_scaling=True).save(tmp_path / "file", scratch=True)
    write_merge_manifest(ads, tmp_path / "manifest", ["d0", "d1", "d2"])
    merged.install()
    want, got = _load(lora_model, tmp_path / "file"), _load(lora_model, tmp_path / "manifest")
    assert set(got.loras) == set(want.loras) and len(want.loras) == 6
    for name, w in want.loras.items():
        g = got.loras[name]
        assert g.rank == w.rank == 6 and g.scaling == w.scaling == 1.0
        assert isinstance(g.lora_a, RankParts) and len(g.lora_a.parts) == 3 and g.lora_a.shape == w.lora_a.shape
        assert torch_equal(g.lora_a.materialize(), w.lora_a) and torch_equal(g.lora_b.materialize(), w.lora_b)
    with pytest.raises(ValueError, match="expected target modules"):
        lora_model.LoRAModel.from_local_checkpoint(
            str(tmp_path / "manifest"), {"gate_proj", "up_proj"}, peft_helper=_helper(tmp_path / "manifest"),
            lora_model_id=2, device="cpu", dtype=None)


def _helper(path):
    from vllm.lora.peft_helper import PEFTHelper

    return PEFTHelper.from_local_dir(str(path), 512)


def torch_equal(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool((a == b).all())


@pytest.mark.parametrize("name", ["PRAG_F32_CACHE_MB", "PRAG_WORKER_ADAPTER_CACHE_MB", "PRAG_VLLM_BUSY_LOOP_S"])
def test_plugin_settings_are_checked_before_vllm_starts(monkeypatch, name):
    """A bad PRAG_* number is one clear error where the engine is configured, not a traceback in vLLM's worker."""
    from prag_vllm.errors import InputError
    from prag_vllm.generate import EngineConfig
    from serving.config import ServerConfig

    for value in ("lots", "-1", "nan"):
        monkeypatch.setenv(name, value)
        with pytest.raises(InputError, match=name):
            ServerConfig().validate()
        with pytest.raises(InputError, match=name):
            EngineConfig(model="m").apply_env()
    monkeypatch.setenv(name, "0")
    ServerConfig().validate()
