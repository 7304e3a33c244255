"""vllm_plugin/parts.py: a merged adapter's factors copied into vLLM's LoRA slots by document
give the slots vLLM's own ``set_lora`` gives the concatenated tensors."""

from __future__ import annotations

import inspect

import pytest
import torch

pytest.importorskip("vllm")

from prag_vllm.vllm_plugin import parts  # noqa: E402
from prag_vllm.vllm_plugin.parts import RankParts  # noqa: E402

GARBAGE = 7.0


class Layer:
    """What ``set_lora`` of vLLM's linear LoRA layers touches, without a model."""

    def __init__(self, fan_in: int, outs: list[int], max_rank: int = 8, slots: int = 3,
                 dtype: torch.dtype = torch.bfloat16):
        from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

        self._reset = BaseLinearLayerWithLoRA.reset_lora
        self.n_slices, self.tp_size = len(outs), 1
        self.lora_a_stacked = tuple(torch.full((slots, 1, max_rank, fan_in), GARBAGE, dtype=dtype) for _ in outs)
        self.lora_b_stacked = tuple(torch.full((slots, 1, out, max_rank), GARBAGE, dtype=dtype) for out in outs)

    def reset_lora(self, index):
        self._reset(self, index)


def _vllm_set_lora(n_slices: int):
    """vLLM's own ``set_lora`` (unwrapped) for a layer of ``n_slices`` slices."""
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.lora.layers.column_parallel_linear import MergedColumnParallelLinearWithLoRA

    fn = (BaseLinearLayerWithLoRA if n_slices == 1 else MergedColumnParallelLinearWithLoRA).set_lora
    return inspect.unwrap(fn)  # under the plugin's wrappers (parts, gather)


DTYPES = {  # parts' dtype -> slots' dtype, and whether B parts are column-major (as the worker's cache keeps them
    # when it does not know the slots' dtype; in the slots' dtype it keeps them row-major)
    "f32-into-f32": (torch.float32, torch.float32, False),
    "bf16-into-bf16": (torch.bfloat16, torch.bfloat16, False),
    "f32-into-bf16": (torch.float32, torch.bfloat16, False),
    "bf16-into-f32-column-major": (torch.bfloat16, torch.float32, True),
    "bf16-into-bf16-column-major": (torch.bfloat16, torch.bfloat16, True),
}


def _factors(fan_in: int, out: int, ranks: list[int], seed: int, dtypes=DTYPES["f32-into-bf16"]):
    """Parts of one slice's A and B, converted on copy where the slot's dtype differs."""
    part, slot, column_major = dtypes
    g = torch.Generator().manual_seed(seed)
    a = [torch.randn(r, fan_in, generator=g).to(part) for r in ranks]
    b = [torch.randn(out, r, generator=g).to(part) for r in ranks]
    if column_major:
        b = [x.t().contiguous().t() for x in b]
    return RankParts(a, 0, slot), RankParts(b, 1, slot)


@pytest.mark.parametrize("dtypes", list(DTYPES))
@pytest.mark.parametrize("outs", [[48], [40, 40], [40, None]], ids=["one-slice", "gate-up", "gate-only"])
@pytest.mark.parametrize("ranks", [[2, 2, 2], [1, 3], [2, 2, 2, 2]])
def test_slots_written_from_parts_equal_vllm_set_lora_of_the_concatenation(outs, ranks, dtypes):
    fan_in, index, slot_dtype = 32, 1, DTYPES[dtypes][1]
    pa, pb = zip(*[_factors(fan_in, out or 40, ranks, seed=i, dtypes=DTYPES[dtypes]) for i, out in enumerate(outs)])
    mine = Layer(fan_in, [o or 40 for o in outs], dtype=slot_dtype)
    theirs = Layer(fan_in, [o or 40 for o in outs], dtype=slot_dtype)
    if len(outs) == 1:
        a, b = pa[0], pb[0]
    else:  # None: the packed layer has no LoRA for that projection (vLLM zeroes its slot)
        a = [x if o else None for x, o in zip(pa, outs)]
        b = [x if o else None for x, o in zip(pb, outs)]
    assert parts.set_lora_by_parts(mine, index, a, b)
    _vllm_set_lora(len(outs))(theirs, index, parts.materialize(a), parts.materialize(b))
    for x, y in zip(mine.lora_a_stacked + mine.lora_b_stacked, theirs.lora_a_stacked + theirs.lora_b_stacked):
        assert torch.equal(x, y)
        assert bool((x[0] == GARBAGE).all() and (x[2] == GARBAGE).all())  # other slots untouched
    r = sum(ranks)
    assert torch.equal(mine.lora_a_stacked[0][index, 0, :r], pa[0].materialize())
    assert bool((mine.lora_a_stacked[0][index, 0, r:] == 0).all())  # rows past the rank: zero, not stale
    assert bool((mine.lora_b_stacked[0][index, 0, :, r:] == 0).all())
    assert parts._ZEROS and all(not z.any() for z in parts._ZEROS.values())  # the shared padding: only read


@pytest.mark.parametrize("prepared", [True, False], ids=["words-from-cache", "words-made-here"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_b_of_one_rank_in_the_slot_dtype_is_written_as_words(dtype, prepared, monkeypatch):
    """Rank-2 documents in the slot's dtype (the worker's cache on any engine): B goes in as
    one stack of machine words, and the slot is bit for bit vLLM's."""
    fan_in, out, index = 32, 40, 2
    g = torch.Generator().manual_seed(1)
    a = [torch.randn(2, fan_in, generator=g).to(dtype) for _ in range(3)]
    b = [torch.randn(out, 2, generator=g).to(dtype) for _ in range(3)]
    words = [parts.as_words(x) for x in b] if prepared else None
    pa, pb = RankParts.trusted(a, 0), RankParts.trusted(b, 1, words=words)
    assert (pb.words is not None) == prepared
    taken = []
    real = parts._fill_b_by_words
    monkeypatch.setattr(parts, "_fill_b_by_words", lambda *args: taken.append(real(*args)) or taken[-1])
    mine, theirs = Layer(fan_in, [out], dtype=dtype), Layer(fan_in, [out], dtype=dtype)
    assert parts.set_lora_by_parts(mine, index, pa, pb)
    _vllm_set_lora(1)(theirs, index, pa.materialize(), pb.materialize())
    assert taken == [True]
    assert torch.equal(mine.lora_b_stacked[0], theirs.lora_b_stacked[0])
    assert torch.equal(mine.lora_a_stacked[0], theirs.lora_a_stacked[0])
    # a B whose documents differ in rank, or a slot of another dtype: not as words, still exact
    taken.clear()
    mixed = RankParts.trusted([b[0], torch.randn(out, 1, generator=g).to(dtype)], 1)
    other = Layer(fan_in, [out], dtype=torch.float32 if dtype == torch.bfloat16 else torch.bfloat16)
    want = Layer(fan_in, [out], dtype=other.lora_b_stacked[0].dtype)
    parts.set_lora_by_parts(other, 0, RankParts.trusted(a[:2], 0), mixed)
    _vllm_set_lora(1)(want, 0, torch.cat(a[:2]), mixed.materialize())
    assert taken == [False] and torch.equal(other.lora_b_stacked[0], want.lora_b_stacked[0])


def test_factors_narrower_than_the_slot_go_through_vllm_code():
    """A factor that does not span the slot (vLLM copies it into a corner) is not written by
    parts: the wrapped set_lora hands vLLM the concatenated tensors instead."""
    a, b = _factors(24, 40, [2, 2], seed=3)  # fan-in 24 < the slot's 32
    layer = Layer(32, [40])
    assert not parts.set_lora_by_parts(layer, 0, a, b)
    assert bool((layer.lora_a_stacked[0] == GARBAGE).all())  # nothing half-written
    want = Layer(32, [40])
    _vllm_set_lora(1)(want, 0, a.materialize(), b.materialize())
    parts._wrap(_vllm_set_lora(1), True)(layer, 0, a, b)
    assert torch.equal(layer.lora_a_stacked[0], want.lora_a_stacked[0])
    assert torch.equal(layer.lora_b_stacked[0], want.lora_b_stacked[0])


def test_wrapped_set_lora_takes_parts_or_falls_back_to_tensors():
    fan_in, outs = 16, [24, 24]
    a, b = zip(*[_factors(fan_in, out, [2, 2], seed=5 + i) for i, out in enumerate(outs)])
    original = _vllm_set_lora(2)
    want = Layer(fan_in, outs)
    original(want, 0, parts.materialize(list(a)), parts.materialize(list(b)))
    for by_parts in (True, False):  # False: a layer type the parts path does not know
        got = Layer(fan_in, outs)
        parts._wrap(original, by_parts)(got, 0, list(a), list(b))
        assert all(torch.equal(x, y) for x, y in zip(got.lora_a_stacked + got.lora_b_stacked,
                                                     want.lora_a_stacked + want.lora_b_stacked))
    sharded = Layer(fan_in, outs)
    sharded.tp_size = 2  # tensor parallel: vLLM slices the tensors itself, so no parts path
    assert not parts.set_lora_by_parts(sharded, 0, list(a), list(b))
    assert bool((sharded.lora_a_stacked[0] == GARBAGE).all())


def test_rank_parts_behave_like_the_concatenated_tensor_and_stay_unwritten():
    a = [torch.ones(2, 4, dtype=torch.bfloat16), torch.full((1, 4), 3.0, dtype=torch.bfloat16)]
    rp = RankParts(a, 0)
    assert rp.shape == (3, 4) and rp.dtype == torch.bfloat16 and rp.to(device="cpu", dtype=torch.float32).dtype == torch.float32
    scaled = rp
    scaled *= 2.0  # vLLM's optimize(): must not scale the cached document tensors
    assert torch.equal(a[0], torch.ones(2, 4, dtype=torch.bfloat16)) and scaled is not rp
    assert torch.equal(scaled.materialize(), 2 * rp.materialize())
    with pytest.raises(ValueError, match="differ"):
        RankParts([torch.ones(2, 4), torch.ones(2, 5)], 0)
    assert parts.has_parts([None, rp]) and not parts.has_parts([None, torch.ones(1)])


def test_install_wraps_every_vllm_lora_layer_set_lora():
    from vllm.lora.layers.base import BaseLayerWithLoRA

    parts.install()
    parts.install()  # idempotent
    classes = [c for c in parts._subclasses(BaseLayerWithLoRA) if "set_lora" in c.__dict__]
    assert len(classes) >= 5
    ours = parts._wrap(lambda *a: None, False).__code__
    for c in classes:
        chain, fn = [], c.__dict__["set_lora"]
        while fn is not None:  # the plugin's wrappers (gather's may sit outside) down to vLLM's own
            chain.append(fn)
            fn = getattr(fn, "__wrapped__", None)
        assert [f.__code__ is ours for f in chain].count(True) == 1, c


def test_slot_views_are_kept_on_the_layer_and_follow_a_new_stacked_tensor():
    layer = Layer(16, [24])
    stacked = layer.lora_a_stacked[0]
    view = parts._slot(layer, stacked, 1)
    assert view.data_ptr() == stacked[1, 0].data_ptr() and parts._slot(layer, stacked, 1) is view
    view.fill_(3.0)
    assert bool((stacked[1, 0] == 3.0).all()) and stacked._version > 0  # a write the version counter sees
    layer.lora_a_stacked = (torch.zeros_like(stacked),)  # a new buffer (never done by vLLM today): new views
    fresh = parts._slot(layer, layer.lora_a_stacked[0], 1)
    assert fresh.data_ptr() == layer.lora_a_stacked[0][1, 0].data_ptr() != view.data_ptr()
