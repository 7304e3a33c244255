"""Slot-major LoRA pools (:mod:`prag_vllm.vllm_plugin.pools`): the layers' buffers moved
into one pool per projection kind, and a merged adapter written by document, bit for bit
what vLLM's per-layer ``set_lora`` of the concatenated adapter writes."""

from __future__ import annotations

import pytest
import torch

from prag_vllm.vllm_plugin import gather, parts, pools, ranks

H, I, R, SLOTS, LAYERS = 16, 24, 8, 4, 12  # 12 layers: "layers.10" sorts after "layers.9"  # noqa: E741  (the input width, as in the LoRA papers)
PACKED = {"gate_up_proj": ["gate_proj", "up_proj"]}


class Linear:
    """A stand-in for vLLM's linear LoRA layers (no tensor parallelism): stacked buffers
    ``slots x 1 x R x in`` / ``slots x 1 x out x R`` per slice, written by ``set_lora``."""

    tp_size = 1

    def __init__(self, sizes: list[tuple[int, int]], dtype: torch.dtype, g: torch.Generator):
        self.n_slices = len(sizes)
        self.lora_a_stacked = tuple(torch.randn(SLOTS, 1, R, i, generator=g).to(dtype) for i, _ in sizes)
        self.lora_b_stacked = tuple(torch.randn(SLOTS, 1, o, R, generator=g).to(dtype) for _, o in sizes)

    def set_lora(self, index, lora_a, lora_b):
        assert parts.set_lora_by_parts(self, index, lora_a, lora_b)

    set_lora._prag_by_parts = True


def modules(dtype: torch.dtype, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(LAYERS):
        out[f"model.layers.{layer}.mlp.gate_up_proj"] = Linear([(H, I), (H, I)], dtype, g)
        out[f"model.layers.{layer}.mlp.down_proj"] = Linear([(I, H)], dtype, g)
    return out


def document(seed: int, dtype: torch.dtype, r: int = 2) -> dict:
    g = torch.Generator().manual_seed(100 + seed)
    weights = {}
    for layer in range(LAYERS):
        for kind, (i, o) in {"gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}.items():
            weights[f"model.layers.{layer}.mlp.{kind}"] = (torch.randn(r, i, generator=g).to(dtype),
                                                          torch.randn(o, r, generator=g).to(dtype))
    return weights


def per_layer_write(mods: dict, index: int, docs: list[dict]) -> None:
    """The reference: every layer's ``set_lora`` with the documents' factors as RankParts."""
    for path, m in mods.items():
        prefix, _, leaf = path.rpartition(".")
        subs = PACKED.get(leaf, [leaf])
        a = [parts.RankParts([d[f"{prefix}.{s}"][0] for d in docs], 0) for s in subs]
        b = [parts.RankParts([d[f"{prefix}.{s}"][1] for d in docs], 1) for s in subs]
        m.set_lora(index, a if len(subs) > 1 else a[0], b if len(subs) > 1 else b[0])


def snapshot(mods: dict) -> list[torch.Tensor]:
    return [t.clone() for m in mods.values() for t in (*m.lora_a_stacked, *m.lora_b_stacked)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_build_moves_every_layer_into_pools_keeping_values_and_shapes(dtype):
    mods = modules(dtype)
    before = snapshot(mods)
    built = pools.build(mods, PACKED)
    assert built is not None and sorted(built.pools) == ["down_proj", "gate_proj", "up_proj"]
    assert built.pools["gate_proj"].names[9:11] == ("model.layers.9.mlp.gate_proj", "model.layers.10.mlp.gate_proj")
    after = snapshot(mods)
    assert all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(before, after))
    # the layer tensors live on the pool: a write through either is seen by the other
    layer = mods["model.layers.10.mlp.gate_up_proj"]
    pool = built.pools["up_proj"]
    layer.lora_b_stacked[1][2, 0, 5, 3] = 7.0
    assert pool.b[2, 10, 5, 3] == 7.0
    pool.a[1, 10].fill_(3.0)
    assert bool((layer.lora_a_stacked[1][1, 0] == 3.0).all())
    # ...but each keeps its own version counter (a write to one layer is not a write to all)
    other = mods["model.layers.3.mlp.gate_up_proj"].lora_a_stacked[1]
    v = other._version
    layer.lora_a_stacked[1][0].zero_()
    assert other._version == v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("doc_dtype", ["same", "bf16"])
def test_pool_write_equals_vllm_set_lora_per_layer(dtype, doc_dtype):
    """Three rank-2 documents into a rank-8 slot that held garbage: the same bits as every
    layer's ``set_lora`` (A rows and B columns side by side, zeros after); documents in
    another dtype convert exactly as ``Tensor.to`` does."""
    ddt = dtype if doc_dtype == "same" else torch.bfloat16
    docs = [document(i, ddt) for i in range(3)]
    stacked = [pools.stack_document(d) for d in docs]
    pooled, plain = modules(dtype), modules(dtype)
    built = pools.build(pooled, PACKED)
    assert built.accepts([s for _, s in stacked])
    assert built.write(2, [s for _, s in stacked]) == 6
    per_layer_write(plain, 2, [w for w, _ in stacked])
    for x, y in zip(snapshot(pooled), snapshot(plain)):
        assert torch.equal(x, y)
    if dtype == ddt:  # B went as machine words: the word view exists for rank 2
        assert 2 in built.pools["down_proj"].words


def test_note_bumps_versions_and_records_rank_and_mirror():
    """After a pool write, the caches that watch the layers' version counters see it: the
    ranks record 6 for the slot, the gather kernels' mirror of B re-transposes that slot."""
    mods = modules(torch.float32)
    built = pools.build(mods, PACKED)
    layer = mods["model.layers.4.mlp.down_proj"]
    sa, sb = tuple(layer.lora_a_stacked), tuple(layer.lora_b_stacked)
    for i in range(SLOTS):  # known ranks before (as after vLLM's own writes)
        ranks.note(sa, sb, i, R, ranks.versions(sa, sb))
    gather.mirror(sb[0])
    v = ranks.versions(sa, sb)
    docs = [pools.stack_document(document(i, torch.float32))[1] for i in range(3)]
    built.note(1, built.write(1, docs))
    assert all(after > before for after, before in zip(ranks.versions(sa, sb), v))
    assert ranks.slot_ranks(sa, sb) == [R, 6, R, R]
    assert torch.equal(gather.mirror(sb[0]), sb[0].squeeze(1).transpose(1, 2))


def test_accepts_only_documents_that_cover_the_pools_and_fit():
    built = pools.build(modules(torch.float32), PACKED)
    docs = [pools.stack_document(document(i, torch.float32))[1] for i in range(3)]
    assert built.accepts(docs)
    assert not built.accepts([])
    assert not built.accepts(docs + [pools.stack_document(document(3, torch.float32, r=4))[1]])  # rank 10 > 8
    missing = dict(docs[0])
    del missing["down_proj"]
    assert not built.accepts([missing])
    fewer = {k: pools.stack_document({m: w for m, w in document(0, torch.float32).items() if ".layers.1." not in m})[1][k]
             for k in docs[0]}
    assert not built.accepts([fewer])  # a layer short: names differ


def test_build_leaves_layers_alone_unless_all_can_be_pooled():
    mods = modules(torch.float32)
    mods["model.layers.0.mlp.down_proj"].tp_size = 2
    ids = [id(t) for m in mods.values() for t in m.lora_a_stacked]
    assert pools.build(mods, PACKED) is None
    assert ids == [id(t) for m in mods.values() for t in m.lora_a_stacked]
    assert pools.build(modules(torch.float32), {"gate_up_proj": ["gate_proj"]}) is None  # slices != names


def test_stack_document_keeps_values_and_skips_uneven_kinds():
    w = document(0, torch.float32)
    w["model.layers.0.mlp.extra_proj"] = (torch.ones(2, 3), torch.ones(5, 2))
    w["model.layers.1.mlp.extra_proj"] = (torch.ones(2, 4), torch.ones(5, 2))
    out, stacks = pools.stack_document(w)
    assert sorted(stacks) == ["down_proj", "gate_proj", "up_proj"]
    assert all(torch.equal(out[m][0], w[m][0]) and torch.equal(out[m][1], w[m][1]) for m in w)
    s = stacks["gate_proj"]
    assert s.names[2] == "model.layers.2.mlp.gate_proj" and torch.equal(s.a[2], w[s.names[2]][0])
    assert torch.equal(s.words[2], s.b[2].contiguous().view(torch.int64).view(-1))


def test_slot_pools_setting_is_checked(monkeypatch):
    from prag_vllm.errors import InputError
    from prag_vllm.vllm_plugin import settings

    monkeypatch.setenv("PRAG_LORA_SLOT_POOLS", "yes")
    with pytest.raises(InputError, match="PRAG_LORA_SLOT_POOLS must be one of 1, 0"):
        settings.check()


def test_pooled_model_has_no_factors_and_needs_pools_that_take_its_documents(monkeypatch):
    """With slot pools in the worker, a manifest's ``LoRAModel`` is built without factors (the
    pools write the documents' stacks); without pools, or documents they cannot take, the
    caller builds the full model. vLLM's activation refuses a factorless model the pools
    cannot take, rather than activating nothing."""
    import weakref

    from vllm.lora.lora_model import LoRAModel

    from prag_vllm.vllm_plugin.merged import CachedDocument, pooled_model

    docs = []
    for i in range(3):
        weights, stacks = pools.stack_document(document(i, torch.float32))
        docs.append(CachedDocument(None, {}, stacks))
    monkeypatch.setattr(pools, "_CURRENT", None)
    assert pooled_model(LoRAModel, 7, docs) is None
    built = pools.build(modules(torch.float32), PACKED)
    monkeypatch.setattr(pools, "_CURRENT", weakref.ref(built))
    model = pooled_model(LoRAModel, 7, docs)
    assert model.id == 7 and model.rank == 6 and model.loras == {} and model._prag_docs == [d.stacks for d in docs]
    too_big = docs + [CachedDocument(None, {}, pools.stack_document(document(9, torch.float32, r=4))[1])]
    assert pooled_model(LoRAModel, 8, too_big) is None


def test_manager_activates_pooled_models_through_the_pools_and_refuses_them_without():
    """vLLM's ``activate_adapter`` (wrapped by ``pools.install``): a model with documents goes
    to the first free slot through the pools, bit for bit every layer's ``set_lora``; the
    factorless one on a manager without pools is an error, not an adapter that adds nothing."""
    from types import SimpleNamespace

    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.model_manager import LoRAModelManager

    pools.install()
    weights, stacks = zip(*(pools.stack_document(document(i, torch.float32)) for i in range(3)))
    model = LoRAModel(7, rank=6, loras={})
    model._prag_docs = list(stacks)
    mods, plain = modules(torch.float32), modules(torch.float32)
    manager = SimpleNamespace(_active_adapters={}, _registered_adapters={7: model}, lora_index_to_id=[3, None, None, None],
                              _prag_slot_pools=pools.build(mods, PACKED))
    assert LoRAModelManager.activate_adapter(manager, 7) is True
    assert manager.lora_index_to_id == [3, 7, None, None] and 7 in manager._active_adapters
    per_layer_write(plain, 1, list(weights))
    assert all(torch.equal(x, y) for x, y in zip(snapshot(mods), snapshot(plain)))
    assert LoRAModelManager.activate_adapter(manager, 7) is False  # already active
    bare = SimpleNamespace(_active_adapters={}, _registered_adapters={7: model}, lora_index_to_id=[None] * 4,
                           _prag_slot_pools=None)
    with pytest.raises(ValueError, match="slot pools"):
        LoRAModelManager.activate_adapter(bare, 7)
