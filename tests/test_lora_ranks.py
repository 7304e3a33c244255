"""vllm_plugin/ranks.py: the LoRA ops compute with the rank a slot holds, not its padding.

Slots are sized for max_lora_rank (8) and a merged top-3 adapter fills 6 rows. The ranks
are recorded by the set_lora/reset_lora wrappers; a write they did not see makes the
layer's slots full rank again. To show that the ops really skip the padding, the tests put
non-zero values into it and then record a smaller rank: the result must ignore them."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from conftest import lora_reference  # noqa: E402
from prag_vllm.vllm_plugin import gather, punica, ranks  # noqa: E402
from prag_vllm.vllm_plugin.parts import RankParts  # noqa: E402

IN, R, SLOTS, OUTS, SCALE = 40, 8, 6, (24, 16), 0.5


def stacked(seed=0):
    g = torch.Generator().manual_seed(seed)
    a = tuple(torch.randn(SLOTS, 1, R, IN, generator=g) for _ in OUTS)
    b = tuple(torch.randn(SLOTS, 1, o, R, generator=g) for o in OUTS)
    return a, b


def claim(a, b, slot_rank: dict[int, int]) -> None:
    """Record ranks as if the wrappers had seen the writes (the padding keeps its values)."""
    for slot, rank in slot_rank.items():
        ranks.note(a, b, slot, rank, ranks.versions(a, b))


def zero_padding(a, b, slot_rank: dict[int, int]):
    """Copies of ``a``, ``b`` with each slot's rows of A / columns of B past its rank zeroed."""
    a, b = tuple(t.clone() for t in a), tuple(t.clone() for t in b)
    for slot, rank in slot_rank.items():
        for t in a:
            t[slot, :, rank:] = 0
        for t in b:
            t[slot, :, :, rank:] = 0
    return a, b


def test_rank_of_what_set_lora_gets():
    assert ranks.rank_of(torch.zeros(6, IN)) == 6
    assert ranks.rank_of([torch.zeros(4, IN), None, torch.zeros(6, IN)]) == 6
    assert ranks.rank_of(RankParts([torch.zeros(2, IN)] * 3, dim=0)) == 6
    assert ranks.rank_of(None) == 0
    assert ranks.rank_of(object()) is None


def test_nested_writes_keep_ranks_and_unseen_writes_forget_them():
    a, b = stacked()
    before = ranks.versions(a, b)
    a[0][2].zero_()  # vLLM's set_lora resets the slot first (a nested, noted write)...
    ranks.note(a, b, 2, 0, before)
    a[0][2, 0, :3] = 1.0  # ...then copies the adapter in
    ranks.note(a, b, 2, 3, before)
    assert ranks.slot_ranks(a, b)[2] == 3
    assert ranks.slot_ranks(a, b)[0] == R  # never written through the wrappers: full
    b[1][4].zero_()  # a write nobody noted
    assert ranks.slot_ranks(a, b) is None
    ranks.note(a, b, 5, 2, ranks.versions(a, b))
    assert ranks.slot_ranks(a, b)[2] == R and ranks.slot_ranks(a, b)[5] == 2


@pytest.mark.parametrize("indices", [
    [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 3, 3],  # runs: a long one, a short one
    [0, 1, 2, 3, 4, 5, -1, 2, 1],  # gather: every token by slot
    [2] * 20 + [0, 1, 3, 4, 5, -1],  # mixed
], ids=["runs", "gather", "mixed"])
@pytest.mark.parametrize("invariant", [False, True], ids=["plans", "rows"])
def test_ops_skip_the_padding(indices, invariant):
    """Slots hold ranks 0-6 (zeros past each rank), plus non-zero values in rows 6-7 that
    the recorded ranks say are padding: the ops must give the result without them.
    (Runs use each slot's rank; by-slot steps the largest rank among their slots.)"""
    slot_rank = {0: 6, 1: 6, 2: 3, 3: 2, 4: 0, 5: 5}
    za, zb = zero_padding(*stacked(seed=1), slot_rank)
    garbage_a, garbage_b = stacked(seed=4)
    a = tuple(t + torch.nn.functional.pad(g[:, :, 6:], (0, 0, 6, 0)) for t, g in zip(za, garbage_a))
    b = tuple(t + torch.nn.functional.pad(g[..., 6:], (6, 0)) for t, g in zip(zb, garbage_b))
    claim(a, b, slot_rank)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(len(indices), IN, generator=g), torch.randn(len(indices), sum(OUTS), generator=g)
    idx = torch.tensor(indices)
    plan = punica.make_plan(idx, invariant=invariant)
    out = y.clone()
    gather._FAILED = False
    punica.apply_plan(plan, out, x, a, b, SCALE, OUTS)
    torch.testing.assert_close(out, lora_reference(y, x, za, zb, idx, OUTS, SCALE), rtol=1e-5, atol=1e-5)
    assert not gather._FAILED
    ranks._RANKS.clear()  # unknown again: the same call uses the whole slot, "padding" included
    out = y.clone()
    punica.apply_plan(plan, out, x, a, b, SCALE, OUTS)
    torch.testing.assert_close(out, lora_reference(y, x, a, b, idx, OUTS, SCALE), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, lora_reference(y, x, za, zb, idx, OUTS, SCALE), rtol=1e-5, atol=1e-5)


def test_wrapped_set_lora_records_the_rank():
    """Through the real wrappers (gather.install) of a vLLM layer class's set_lora/reset_lora."""
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

    gather.install()

    class Layer(BaseLinearLayerWithLoRA):
        def __init__(self):  # only what set_lora/reset_lora touch
            self.lora_a_stacked, self.lora_b_stacked = stacked(seed=3)
            self.lora_a_stacked, self.lora_b_stacked = self.lora_a_stacked[:1], self.lora_b_stacked[:1]
            self.tp_size, self.n_slices, self.output_slices = 1, 1, (OUTS[0],)
            self.lora_config = None

    layer = Layer()
    assert getattr(type(layer).__mro__[1].set_lora, "_prag_gather", False)
    layer.set_lora(3, torch.ones(5, IN), torch.ones(OUTS[0], 5))
    known = ranks.slot_ranks(layer.lora_a_stacked, layer.lora_b_stacked)
    assert known is not None and known[3] == 5
    layer.reset_lora(3)
    assert ranks.slot_ranks(layer.lora_a_stacked, layer.lora_b_stacked)[3] == 0
