"""vllm_plugin/gather.py: decode steps with many distinct adapters, by slot index.

The compiled kernels against vLLM's reference ops; the transposed mirror of the stacked B
following every write to the slots (noted ones slot by slot, others all at once); the
eager fallback when compiling fails."""

from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("vllm")

from conftest import lora_reference  # noqa: E402
from prag_vllm.vllm_plugin import gather  # noqa: E402

IN, R, SLOTS, OUTS, SCALE = 40, 8, 5, (24, 16), 0.75


def weights(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = tuple(torch.randn(SLOTS, 1, R, IN, generator=g).to(dtype) for _ in OUTS)
    b = tuple(torch.randn(SLOTS, 1, o, R, generator=g).to(dtype) for o in OUTS)
    return a, b


def reference(y, x, rows, slots, a, b):
    """vLLM's reference ops on ``rows`` (None = all) with their ``slots``."""
    per_row = slots.clone() if rows is None else torch.full((len(x),), -1, dtype=slots.dtype).index_copy_(0, rows, slots)
    return lora_reference(y, x, a, b, per_row, OUTS, SCALE)


def run(y, x, rows, slots, a, b):
    out = y.clone()
    gather.apply_gather(out, x, rows, slots, a, b, SCALE, OUTS)
    return out


@pytest.fixture(autouse=True)
def compiled():
    gather._FAILED = False
    yield
    assert not gather._FAILED, "the compiled kernels fell back to eager"


@pytest.mark.parametrize("rows", [None, [0, 2, 3, 6]], ids=["every-row", "some-rows"])
def test_compiled_kernels_match_reference_float32(rows):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(7, IN, generator=g), torch.randn(7, sum(OUTS), generator=g)
    a, b = weights()
    rows = None if rows is None else torch.tensor(rows)
    slots = torch.tensor([3, 0, 4, 4, 1, 2, 0]) if rows is None else torch.tensor([1, 4, 0, 1])
    out = run(y, x, rows, slots, a, b)
    torch.testing.assert_close(out, reference(y, x, rows, slots, a, b), rtol=1e-5, atol=1e-5)
    if rows is not None:
        untouched = torch.ones(7, dtype=torch.bool)
        untouched[rows] = False
        assert torch.equal(out[untouched], y[untouched])


def test_compiled_kernels_bf16_close_to_float32():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(9, IN, generator=g).bfloat16(), torch.randn(9, sum(OUTS), generator=g).bfloat16()
    a, b = weights(torch.bfloat16)
    slots = torch.tensor([0, 1, 2, 3, 4, 4, 3, 2, 1])
    out = run(y, x, None, slots, a, b)
    want = reference(y.float(), x.float(), None, slots, tuple(t.float() for t in a), tuple(t.float() for t in b))
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=0.25)


class Layer:
    """A LoRA layer's stacked tensors and a ``set_lora``/``reset_lora`` that write one slot."""

    def __init__(self):
        self.lora_a_stacked, self.lora_b_stacked = weights(seed=3)

    def set_lora(self, index, seed):
        new_a, new_b = weights(seed=seed)
        for t, n in zip(self.lora_a_stacked + self.lora_b_stacked, new_a + new_b):
            t[index].copy_(n[index])

    def reset_lora(self, index):
        for t in self.lora_a_stacked + self.lora_b_stacked:
            t[index] = 0


class Noted(Layer):
    set_lora = gather._wrap(Layer.set_lora, reset=False)
    reset_lora = gather._wrap(Layer.reset_lora, reset=True)


def _step(layer, slots):
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(len(slots), IN, generator=g), torch.zeros(len(slots), sum(OUTS))
    slots = torch.tensor(slots)
    out = run(y, x, None, slots, layer.lora_a_stacked, layer.lora_b_stacked)
    torch.testing.assert_close(out, reference(y, x, None, slots, layer.lora_a_stacked, layer.lora_b_stacked),
                               rtol=1e-5, atol=1e-5)


def _mirrors(layer):
    return [gather._MIRRORS[id(t)] for t in layer.lora_b_stacked]


def test_mirror_follows_noted_writes_slot_by_slot(monkeypatch):
    layer = Noted()
    _step(layer, [0, 1, 2, 3, 4])
    copied = []
    monkeypatch.setattr(gather, "_transpose_all", lambda m, b3: copied.append("all") or b3)
    layer.set_lora(2, seed=5)
    layer.reset_lora(4)
    assert [m.pending for m in _mirrors(layer)] == [{2, 4}, {2, 4}]
    _step(layer, [4, 2, 2, 0, 1])
    assert copied == [] and all(not m.pending for m in _mirrors(layer))


def test_mirror_rebuilt_after_a_write_it_did_not_see():
    layer = Noted()
    _step(layer, [0, 1, 2, 3, 4])
    layer.lora_b_stacked[0][3] = 1.5  # not through set_lora/reset_lora
    layer.set_lora(1, seed=6)  # noted, but after the unnoted write
    assert [bool(m.pending) for m in _mirrors(layer)] == [False, True]
    _step(layer, [3, 1, 0, 3, 1])


def test_unwrapped_layer_still_correct():
    layer = Layer()  # vLLM's writes not noted at all: every version change re-transposes
    _step(layer, [0, 1, 2, 3, 4])
    layer.set_lora(0, seed=7)
    _step(layer, [0, 0, 1, 4, 2])


def test_falls_back_to_eager_when_compiling_fails(monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(gather, "_kernel", lambda: (broken, broken))
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(6, IN, generator=g), torch.randn(6, sum(OUTS), generator=g)
    a, b = weights()
    slots = torch.tensor([4, 3, 2, 1, 0, 0])
    with caplog.at_level(logging.WARNING, logger=gather.__name__):
        out = run(y, x, None, slots, a, b)
    assert gather._FAILED and "no C++ compiler" in caplog.text
    torch.testing.assert_close(out, reference(y, x, None, slots, a, b), rtol=1e-5, atol=1e-5)
    gather._FAILED = False


def test_every_vllm_lora_layer_notes_its_writes():
    from vllm.lora.layers.base import BaseLayerWithLoRA

    from prag_vllm.vllm_plugin import parts

    gather.install()
    for cls in parts._subclasses(BaseLayerWithLoRA):
        for name in ("set_lora", "reset_lora"):
            fn = cls.__dict__.get(name)
            assert fn is None or getattr(fn, "_prag_gather", False), f"{cls.__name__}.{name}"
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

    assert getattr(BaseLinearLayerWithLoRA.set_lora, "_prag_parts", False), "parts' wrapper must stay inside"


def test_a_slice_that_fails_to_compile_is_added_once(monkeypatch):
    """The expand of the second slice fails (a recompile for another shape): the first
    slice, already added by the compiled path, must not be added again by the eager one."""
    shrink, expand_add = gather._kernel()
    calls = []

    def second_fails(y, bt, slots, h):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("recompile failed")
        expand_add(y, bt, slots, h)

    monkeypatch.setattr(gather, "_kernel", lambda: (shrink, second_fails))
    g = torch.Generator().manual_seed(9)
    x, y = torch.randn(5, IN, generator=g), torch.randn(5, sum(OUTS), generator=g)
    a, b = weights(seed=1)
    for rows, slots in ((None, torch.tensor([0, 1, 2, 3, 4])), (torch.tensor([1, 3, 4]), torch.tensor([2, 2, 0]))):
        calls.clear()
        gather._FAILED = False
        out = run(y, x, rows, slots, a, b)
        torch.testing.assert_close(out, reference(y, x, rows, slots, a, b), rtol=1e-5, atol=1e-5)
        assert gather._FAILED and len(calls) == 2
    gather._FAILED = False
