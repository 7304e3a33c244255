"""The planned CPU punica wrapper (prag_vllm.vllm_plugin.punica) vs vLLM's reference ops.

Each case runs vLLM's real ``PunicaWrapperCPU`` metadata path (``update_metadata`` with a
``LoRAMapping``), then one multi-slice ``add_lora_linear`` call, and compares it with the
reference torch ops slice by slice; tokens without an adapter must be left untouched.
"""

import pytest
import torch
from vllm.lora.layers.utils import LoRAMapping
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from conftest import lora_reference
from prag_vllm.vllm_plugin import punica

IN, R, SLOTS, OUTS, SCALE = 40, 8, 4, (24, 24), 0.75


class Planned(PunicaWrapperCPU):
    pass


punica.install(Planned)


@pytest.fixture(autouse=True)
def _plan_kinds(monkeypatch):
    """These tests are about the plan kinds of ``PRAG_LORA_BATCH_INVARIANT=0``; the ``rows``
    plans of the batch-invariant mode: tests/test_batch_invariance.py."""
    monkeypatch.setenv("PRAG_LORA_BATCH_INVARIANT", "0")


def weights(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = tuple(torch.randn(SLOTS, 1, R, IN, generator=g).to(dtype) for _ in OUTS)
    b = tuple(torch.randn(SLOTS, 1, o, R, generator=g).to(dtype) for o in OUTS)
    return a, b


def reference(y, x, a, b, slots):
    """vLLM's reference ops, applied only to rows whose slot is >= 0."""
    return lora_reference(y, x, a, b, slots, OUTS, SCALE)


def planned(slots: list[int], x, y, a, b, prefill: bool):
    wrapper = Planned(max_num_batched_tokens=256, max_batches=64, device="cpu")
    ids = tuple(s + 1 for s in slots)  # lora id = slot + 1; 0 = no adapter
    wrapper.update_metadata(LoRAMapping(ids, ids, is_prefill=prefill), [1, 2, 3, 4], SLOTS, 100)
    out = y.clone()
    wrapper.add_lora_linear(out, x, a, b, SCALE, OUTS)
    return wrapper, out


CASES = {
    "single-request-prefill": ([2] * 30, True, "runs"),
    "two-requests-prefill": ([1] * 20 + [3] * 17, True, "runs"),
    "prefill-with-base-request": ([0] * 12 + [-1] * 9 + [3] * 20, True, "runs"),
    "decode-distinct": ([0, 1, 2, 3, 1, 2, 0, 3, 2], False, "gather"),
    "decode-mixed-with-base": ([0, -1, 2, 3, -1, 1, 2, -1, 0], False, "gather"),
    "decode-single": ([1], False, "runs"),
    "prefill-batched-with-decodes": ([2] * 18 + [0, 1, -1, 3, 1, 2] + [3] * 16 + [0], True, "mixed"),
    "no-adapter-at-all": ([-1] * 7, False, "none"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_planned_wrapper_matches_reference(case):
    slots, prefill, kind = CASES[case]
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(len(slots), IN, generator=g), torch.randn(len(slots), sum(OUTS), generator=g)
    a, b = weights()
    wrapper, out = planned(slots, x, y, a, b, prefill)
    assert wrapper._prag_plan.kind == kind
    expected = reference(y, x, a, b, torch.tensor(slots))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    base = torch.tensor(slots) < 0
    assert torch.equal(out[base], y[base]), "tokens without an adapter must be untouched"


def test_bf16_close_to_reference():
    slots = [0, 1, -1, 3, 2, 2, 1, 0, -1, 3]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(len(slots), IN, generator=g).bfloat16()
    y = torch.randn(len(slots), sum(OUTS), generator=g).bfloat16()
    a, b = weights(torch.bfloat16)
    _, out = planned(slots, x, y, a, b, False)
    expected = reference(y, x, a, b, torch.tensor(slots))
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=0.5)


def test_plan_is_rebuilt_when_the_mapping_changes():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, IN, generator=g), torch.randn(6, sum(OUTS), generator=g)
    a, b = weights()
    wrapper, _ = planned([0] * 6, x, y, a, b, True)
    wrapper.update_metadata(LoRAMapping((3, 3, 0, 0, 2, 2), (3, 3, 0, 0, 2, 2), is_prefill=True), [1, 2, 3, 4],
                            SLOTS, 100)
    out = y.clone()
    wrapper.add_lora_linear(out, x, a, b, SCALE, OUTS)
    torch.testing.assert_close(out, reference(y, x, a, b, torch.tensor([2, 2, -1, -1, 1, 1])), rtol=1e-5, atol=1e-5)



def test_float32_slot_copies_follow_writes_to_the_slots():
    """Decode runs use cached float32 copies of bf16 slot weights; writing a slot (vLLM
    activating another adapter there) must be seen by the next step."""
    a, b = weights(torch.bfloat16, seed=3)
    x, y = torch.randn(1, IN).to(torch.bfloat16), torch.zeros(1, sum(OUTS), dtype=torch.bfloat16)
    _, first = planned([1], x, y, a, b, prefill=False)
    assert (first - reference(y, x, a, b, torch.tensor([1]))).abs().max() < 0.05 * first.abs().max()
    _, again = planned([1], x, y, a, b, prefill=False)
    assert torch.equal(first, again) and (id(a[0]), 1) in punica._F32  # served from the cache
    new_a, new_b = weights(torch.bfloat16, seed=4)
    for stacked, new in zip(a + b, new_a + new_b):
        stacked[1] = new[1]  # in place, as vLLM's set_lora does
    _, after = planned([1], x, y, a, b, prefill=False)
    want = reference(y, x, a, b, torch.tensor([1]))
    assert not torch.equal(after, first) and (after - want).abs().max() < 0.05 * want.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_program_follows_writes_within_one_plan(dtype):
    """A decode step resolves each layer once per plan (slot ranks, fused float32 copies) and
    reuses it at the next steps; vLLM writing the slot while the plan stands (same token ->
    slot mapping) must invalidate it."""
    a, b = weights(dtype, seed=8)
    g = torch.Generator().manual_seed(9)
    x, y = torch.randn(1, IN, generator=g).to(dtype), torch.randn(1, sum(OUTS), generator=g).to(dtype)
    wrapper, first = planned([2], x, y, a, b, prefill=False)
    program = wrapper._prag_plan.programs[id(a[0])]
    assert program and program.runs[0][:3] == (0, 1, R)  # resolved for this layer
    again = y.clone()
    wrapper.add_lora_linear(again, x, a, b, SCALE, OUTS)
    assert torch.equal(again, first) and wrapper._prag_plan.programs[id(a[0])] is program  # reused
    new_a, new_b = weights(dtype, seed=10)
    for stacked, fresh in zip(a + b, new_a + new_b):
        stacked[2] = fresh[2]  # in place, as vLLM's set_lora does, without a new mapping
    after = y.clone()
    wrapper.add_lora_linear(after, x, a, b, SCALE, OUTS)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=0.25)
    torch.testing.assert_close(after.float(), reference(y, x, a, b, torch.tensor([2])).float(), **tol)
    assert not torch.equal(after, first)


def test_float32_cache_is_bounded(monkeypatch):
    per_slot = 4 * R * (len(OUTS) * IN + sum(OUTS))  # float32 A and B of every slice
    monkeypatch.setattr(punica._F32, "max_bytes", 3 * per_slot)
    punica._F32.clear()
    a, b = weights(torch.bfloat16, seed=5)
    for slot in range(SLOTS):
        punica._fused_f32(a, b, slot, R)
    assert punica._F32.nbytes == 3 * per_slot and len(punica._F32) == 3
    assert [(id(a[0]), s) in punica._F32 for s in range(SLOTS)] == [False, True, True, True]


@pytest.mark.parametrize("outs", [(24, 24), (24, 8, 8), (16,)], ids=["equal-slices", "unequal-slices", "one-slice"])
@pytest.mark.parametrize("n", [1, 3])
def test_small_runs_fused_float32(outs, n):
    """Decode-sized runs use one shrink for all slices and one batched expand (or one
    expand per slice when widths differ), in float32, bit-close to the plain per-slice math."""
    g = torch.Generator().manual_seed(7)
    a = tuple(torch.randn(SLOTS, 1, R, IN, generator=g).to(torch.bfloat16) for _ in outs)
    b = tuple(torch.randn(SLOTS, 1, o, R, generator=g).to(torch.bfloat16) for o in outs)
    x = torch.randn(n + 2, IN, generator=g).to(torch.bfloat16)
    y = torch.randn(n + 2, sum(outs), generator=g).to(torch.bfloat16)
    slots = torch.tensor([-1] + [2] * n + [-1])
    plan = punica.make_plan(slots)
    assert plan.kind == "runs" and plan.runs == [(2, 1, 1 + n)]
    out = y.clone()
    punica.apply_plan(plan, out, x, a, b, SCALE, outs)
    want, offset = y.float().clone(), 0
    for ai, bi, size in zip(a, b, outs):
        want[1:1 + n, offset:offset + size] += (x[1:1 + n].float() @ ai[2, 0].float().T * SCALE) @ bi[2, 0].float().T
        offset += size
    torch.testing.assert_close(out.float(), want.to(torch.bfloat16).float(), rtol=1e-2, atol=1e-2)
    assert torch.equal(out[0], y[0]) and torch.equal(out[-1], y[-1])  # rows without an adapter untouched


@pytest.mark.parametrize("choice,native,want_f32", [("1", True, True), ("0", False, False),
                                                     ("auto", False, True), ("auto", True, False)])
def test_long_runs_in_float32_on_cpus_without_native_bf16(monkeypatch, choice, native, want_f32):
    """Prefill-length bf16 runs compute in float32 (on the cached fused copies) when the CPU
    has no native bf16 matmul or ``PRAG_LORA_RUNS_F32=1``; else in bf16 on views. Either
    way the result matches the float32 math and rows without an adapter stay untouched."""
    monkeypatch.setenv("PRAG_LORA_RUNS_F32", choice)
    monkeypatch.setattr(punica, "native_bf16_cpu", lambda: native)
    punica.runs_in_f32.cache_clear()
    try:
        assert punica.runs_in_f32(torch.bfloat16) is want_f32
        assert punica.runs_in_f32(torch.float32) is False
        a, b = weights(torch.bfloat16, seed=11)
        g = torch.Generator().manual_seed(12)
        n = 3 * punica.MIN_RUN_TOKENS
        x = torch.randn(n + 1, IN, generator=g).to(torch.bfloat16)
        y = torch.randn(n + 1, sum(OUTS), generator=g).to(torch.bfloat16)
        plan = punica.make_plan(torch.tensor([3] * n + [-1]))
        punica._F32.clear()
        out = y.clone()
        punica.apply_plan(plan, out, x, a, b, SCALE, OUTS)
        assert ((id(a[0]), 3) in punica._F32) is want_f32, "the run took the other dtype path"
        want, offset = y.float().clone(), 0
        for ai, bi, size in zip(a, b, OUTS):
            want[:n, offset:offset + size] += (x[:n].float() @ ai[3, 0].float().T * SCALE) @ bi[3, 0].float().T
            offset += size
        torch.testing.assert_close(out.float(), want.to(torch.bfloat16).float(), rtol=2e-2, atol=0.1)
        assert torch.equal(out[-1], y[-1])
    finally:
        punica.runs_in_f32.cache_clear()


def test_runs_f32_setting_is_checked(monkeypatch):
    from prag_vllm.errors import InputError
    from prag_vllm.vllm_plugin import settings

    monkeypatch.setenv("PRAG_LORA_RUNS_F32", "yes please")
    with pytest.raises(InputError, match="PRAG_LORA_RUNS_F32 must be one of auto, 1, 0"):
        settings.check()
