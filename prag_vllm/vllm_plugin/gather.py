"""Decode with many distinct adapters: two fused, compiled kernels per LoRA slice.

When a step's tokens each have their own adapter (a batch of parametric questions, each
with its merged adapter), every token needs its slot's ``A`` (``rank x in``) and ``B``
(``out x rank``). Gathering them (``index_select``) and running two ``bmm`` copies the
weights once more and runs matrix products whose inner size is the rank (8): on this
CPU about 3.5 ms per layer for 100 tokens (Qwen2.5-0.5B), ~170 ms per decode step.

Here each slice is two compiled kernels (``torch.compile``: shrink, expand) that read
the slot weights in place, by index, and accumulate in float32: the index, the conversion
and the reduction are one loop, no copy.

* shrink ``h[n, r] = sum_i A[slot_n, r, i] * x[n, i]`` on vLLM's stacked ``A`` as it is;
* expand ``y[n, o] += sum_r B[slot_n, o, r] * h[n, r]``. vLLM stores ``B`` as ``out x rank``
  per slot: a reduction over 8 contiguous numbers does not vectorize. So the expand reads a
  transposed mirror of the stacked ``B`` (``slots x rank x out``, kept here), where it is a
  sum of 8 rows along ``out``.

The mirror follows vLLM's writes: ``set_lora``/``reset_lora`` of every LoRA layer class are
wrapped to note the slot they wrote, and the next use re-transposes only those slots. A
write this module did not see (the stacked tensor's version counter moved without a
note) re-transposes every slot. It costs as much memory as vLLM's stacked ``B`` and exists
only for layers that served such a step.

The kernel compiles at the first such step of a process (a few seconds; see ``_kernel``).

If compiling fails, or with ``PRAG_LORA_COMPILE=0``, the same step runs eagerly
(gather + ``bmm``, the code before this module).
"""

from __future__ import annotations

import functools
import logging
import weakref
from dataclasses import dataclass

import torch

from prag_vllm.vllm_plugin import patching, ranks
from prag_vllm.vllm_plugin.patching import Patcher

logger = logging.getLogger(__name__)


@dataclass
class _Mirror:
    """The transposed copy of one stacked ``B`` tensor."""

    owner: weakref.ref
    """The stacked ``B`` (``slots x 1 x out x rank``); its id is the key, and an id can be reused."""
    bt: torch.Tensor
    """``slots x rank x out``: every slot's ``B`` transposed."""
    version: int
    """The owner's version counter that ``bt`` plus ``pending`` account for."""
    pending: set[int]
    """Slots written (by a noted ``set_lora``/``reset_lora``) since ``bt`` was last updated."""


_MIRRORS: dict[int, _Mirror] = {}


def _b3(stacked: torch.Tensor) -> torch.Tensor:
    return stacked.squeeze(1) if stacked.dim() == 4 else stacked


def mirror(stacked_b: torch.Tensor) -> torch.Tensor:
    """``stacked_b`` (``slots x [1 x] out x rank``) transposed per slot, up to date."""
    if stacked_b.is_inference():
        raise RuntimeError("LoRA slots created in inference mode have no version counter to follow")
    m = _MIRRORS.get(id(stacked_b))
    b3 = _b3(stacked_b)
    if m is None or m.owner() is not stacked_b:
        bt = b3.transpose(1, 2).contiguous()
        _MIRRORS[id(stacked_b)] = m = _Mirror(weakref.ref(stacked_b), bt, stacked_b._version, set())
    elif m.version != stacked_b._version:  # written behind our back: all slots again
        _transpose_all(m, b3)
        m.version, m.pending = stacked_b._version, set()
    elif m.pending:
        for slot in m.pending:
            m.bt[slot].copy_(b3[slot].t())
        m.pending = set()
    return m.bt


def _transpose_all(m: _Mirror, b3: torch.Tensor) -> None:
    m.bt.copy_(b3.transpose(1, 2))


def note_write(stacked_bs, index: int, versions_before) -> None:
    """Record that slot ``index`` of each of ``stacked_bs`` was just written; a mirror that
    had not seen every write before this one is left to re-transpose all slots."""
    for t, before in zip(stacked_bs, versions_before):
        m = _MIRRORS.get(id(t))
        if m is not None and m.owner() is t and m.version >= before:
            m.pending.add(index)
            m.version = t._version


def note_slot(stacked_a, stacked_b, index: int, rank: int | None, versions_before) -> None:
    """After slot ``index`` of a layer was written: the mirrors re-transpose that slot and
    :mod:`.ranks` records ``rank`` (``versions_before``: :func:`ranks.versions` before the write)."""
    note_write(stacked_b, index, versions_before[len(stacked_a):])
    ranks.note(stacked_a, stacked_b, index, rank, versions_before)


def _stacked(layer, name: str) -> tuple[torch.Tensor, ...]:
    stacked = getattr(layer, name, None)
    return tuple(stacked) if isinstance(stacked, (tuple, list)) else ()


def _wrap(original, reset: bool):
    """``set_lora``/``reset_lora`` (``reset``) that note the slot for the mirrors and the
    rank written for :mod:`.ranks`."""
    @functools.wraps(original)
    def write(self, index, *args, **kwargs):
        stacked_a, stacked = _stacked(self, "lora_a_stacked"), _stacked(self, "lora_b_stacked")
        before_all = ranks.versions(stacked_a, stacked)
        out = original(self, index, *args, **kwargs)
        rank = 0 if reset else ranks.rank_of(args[0] if args else kwargs.get("lora_a"))
        note_slot(stacked_a, stacked, index, rank, before_all)
        return out

    write._prag_gather = True
    return write


def install(patcher: Patcher | None = None) -> None:
    """Wrap ``set_lora`` and ``reset_lora`` of every vLLM LoRA layer class (idempotent).
    Runs after :func:`prag_vllm.vllm_plugin.parts.install`, whose wrapper recognizes
    vLLM's own ``set_lora`` functions."""
    from vllm.lora.layers.base import BaseLayerWithLoRA
    from vllm.v1.worker.worker_base import WorkerBase

    from prag_vllm.vllm_plugin import parts

    p = patching.default(patcher)
    parts.install(p)
    for cls in parts._subclasses(BaseLayerWithLoRA):
        for name in ("set_lora", "reset_lora"):
            fn = cls.__dict__.get(name)
            if fn is not None and not getattr(fn, "_prag_gather", False):
                p.set(cls, name, _wrap(fn, reset=name == "reset_lora"))
    if "prag_gather_state" not in WorkerBase.__dict__:
        # a worker RPC (``collective_rpc("prag_gather_state")``): what the kernels did here
        p.set(WorkerBase, "prag_gather_state", lambda self: state())


def state() -> dict:
    """This process's kernels: compiled (used at least once: the gather kernels, ``rows`` the
    batch-invariant one), failed (running eagerly), and how many stacked ``B`` tensors have a
    mirror."""
    return {"compiled": _KERNEL is not None or _ROWS is not None, "rows": _ROWS is not None, "failed": _FAILED,
            "mirrors": len(_MIRRORS)}


# --- kernels -------------------------------------------------------------------------


def _shrink(x: torch.Tensor, a: torch.Tensor, slots: torch.Tensor, rank: int) -> torch.Tensor:
    """``(n, rank)`` float32: ``x[n] @ a[slots[n], :rank].T``; ``a`` is ``slots x [1 x] max_rank x in``
    (dynamo compiles one graph for every ``rank`` below the slot size and another for a full
    slot)."""
    return (_b3(a)[:, :rank][slots].float() * x.float().unsqueeze(1)).sum(-1)


def _expand(bt: torch.Tensor, slots: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``(n, out)`` float32: ``h[n] @ bt[slots[n], :rank]``, ``rank`` = ``h``'s width; ``bt`` is
    ``slots x max_rank x out``: a sum of ``rank`` rows along ``out``."""
    return (bt[:, :h.shape[1]][slots].float() * h.unsqueeze(2)).sum(1)


def _expand_add(y: torch.Tensor, bt: torch.Tensor, slots: torch.Tensor, h: torch.Tensor) -> None:
    """``y += h[n] @ bt[slots[n]]`` in place, added in float32 and rounded once (converting
    the float32 product and adding it eagerly cost twice the kernel)."""
    y.copy_((y.float() + _expand(bt, slots, h)).to(y.dtype))


_KERNEL = None
_FAILED = False
WARM_UP_ADAPTERS = 5
"""Distinct adapters in one decode step that make it a ``gather`` step (more than
``punica.MAX_RUNS``)."""


def _kernel():
    """:func:`_shrink` and :func:`_expand_add`, compiled at their first use: a few seconds,
    once per process for each variant dynamo guards on (dtype, sizes ``<= 4096`` or not,
    each input's dispatch keys). vLLM's profiling step passes tensors with other dispatch
    keys than its later steps, so the engines warm up with a real step instead
    (``VLLMEngine``/``AsyncEngine``: :data:`WARM_UP_ADAPTERS` requests, zero adapters)."""
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = tuple(torch.compile(f, dynamic=True, fullgraph=True) for f in (_shrink, _expand_add))
    return _KERNEL


def enabled() -> bool:
    from prag_vllm.vllm_plugin import compile as lora_compile

    return lora_compile.enabled() and not _FAILED


def _fail(exc: Exception) -> None:
    global _FAILED
    _FAILED = True
    logger.warning("prag: compiled LoRA gather kernels failed (%s: %s); running them eagerly", type(exc).__name__, exc)


def _apply_compiled(y, x, rows, slots, lora_a, lora_b, scale, output_slices, rank: int) -> int:
    """The compiled path; returns how many slices it added into ``y`` (all, unless
    compiling failed: the caller adds the rest eagerly)."""
    try:
        shrink, expand_add = _kernel()
        xs = x if rows is None else x.index_select(0, rows)
        hs = [shrink(xs, a, slots, rank) for a in lora_a]
    except Exception as exc:  # no compiler, an inductor bug: stay correct, only slower
        _fail(exc)
        return 0
    offset = 0
    for done, (h, b, size) in enumerate(zip(hs, lora_b, output_slices)):
        if scale != 1.0:
            h.mul_(scale)
        try:
            bt = mirror(b)
            if rows is None:
                expand_add(y[:, offset:offset + size], bt, slots, h)
            else:  # (index_add_ on the column slice would copy all of y)
                ys = y[rows, offset:offset + size]
                expand_add(ys, bt, slots, h)
                y[rows, offset:offset + size] = ys
        except Exception as exc:
            _fail(exc)
            return done
        offset += size
    return len(hs)


def _apply_eager(y, x, rows, slots, lora_a, lora_b, scale, output_slices, rank: int, offset: int = 0) -> None:
    dtype = x.dtype
    xs = x if rows is None else x.index_select(0, rows)
    for a, b, size in zip(lora_a, lora_b, output_slices):
        ag = _b3(a)[:, :rank].index_select(0, slots).to(dtype)
        bg = _b3(b)[:, :, :rank].index_select(0, slots).to(dtype)
        h = torch.bmm(ag, xs.unsqueeze(2))  # (n, rank, 1)
        if scale != 1.0:
            h.mul_(scale)
        out = torch.bmm(bg, h).squeeze(2)  # (n, out)
        if rows is None:
            y[:, offset:offset + size] += out
        else:
            y[rows, offset:offset + size] += out
        offset += size


# --- batch-invariant rows --------------------------------------------------------------


def _rows_add(x: torch.Tensor, slots: torch.Tensor, slot_ranks: torch.Tensor, scale: float,
              *aby: torch.Tensor) -> None:
    """``y_i[n] += (x[n] @ A_i[slots[n]].T * scale) @ B_i[slots[n]].T`` for every slice ``i``;
    ``aby`` = ``A_0, Bt_0, y_0, A_1, Bt_1, y_1, ...`` (vLLM's stacked ``A``, the mirror of its
    ``B``, the slice's columns of the output); a row uses its slot's first ``slot_ranks[slot]``
    rows of A (the others, padding, are masked out). Each row on its own, in float32 (a bf16 x
    bf16 product is exact there): the shrink sums over ``in`` in an order fixed by ``in``
    alone; the expand is written out term by term over the slot size, ``((h_0 b_0 + h_1 b_1)
    + h_2 b_2) + ...`` (a masked term adds an exact zero), one pointwise pass fused with the
    add into ``y``, rounded to ``y``'s dtype once, in place."""
    xf = x.float().unsqueeze(1)
    keep = None
    for i in range(0, len(aby), 3):
        a, bt, y = aby[i], aby[i + 1], aby[i + 2]
        h = (_b3(a)[slots].float() * xf).sum(-1)  # (n, slot size)
        if keep is None:
            keep = torch.arange(h.shape[1], device=h.device).unsqueeze(0) < slot_ranks[slots].unsqueeze(1)
        h = torch.where(keep, h, 0.0)
        if scale != 1.0:
            h = h * scale
        b = bt[slots]  # (n, slot size, out): an index into the mirror, read in place by the kernel
        acc = h[:, 0:1] * b[:, 0].float()
        for r in range(1, bt.shape[1]):
            acc = acc + h[:, r:r + 1] * b[:, r].float()
        y.copy_((y.float() + acc).to(y.dtype))


_ROWS = None
EAGER_ROWS = 64
"""Rows per eager :func:`_rows_add` call when the compiled one failed (it holds ``rows x rank x
in`` float32 products)."""


def _rows_kernel():
    """:func:`_rows_add` compiled (once per process and number of slices; ``dynamic``: one
    graph for every number of rows >= 2, so a row's summation order does not depend on how
    many rows share the call)."""
    global _ROWS
    if _ROWS is None:
        _ROWS = torch.compile(_rows_add, dynamic=True, fullgraph=True)
    return _ROWS


def apply_rows(y: torch.Tensor, x: torch.Tensor, rows: torch.Tensor | None, slots: torch.Tensor,
               lora_a: tuple[torch.Tensor, ...], lora_b: tuple[torch.Tensor, ...], scale: float,
               output_slices: tuple[int, ...], slot_ranks: list[int] | None = None) -> None:
    """What :func:`apply_gather` computes, the same way for every row whatever the batch (the
    plugin's batch-invariant mode, ``PRAG_LORA_BATCH_INVARIANT``): every token with an
    adapter, of a prefill run or a decode step, alone or among many, goes through one
    compiled kernel (:func:`_rows_add`), so its result does not depend on the other rows of
    the step, their number, or its position. One row is sent as two (a copy of itself): the
    kernel compiled for n >= 2 rows serves every step. ``slot_ranks``: the rank each slot holds
    (:mod:`.ranks`; None: every slot full), so a row's result does not depend on the other
    slots of the step either."""
    full = lora_a[0].shape[-2]
    ranks_t = torch.tensor(slot_ranks) if slot_ranks is not None else torch.full((lora_a[0].shape[0],), full)
    n = x.shape[0] if rows is None else rows.shape[0]
    if n == 0:
        return
    width = sum(output_slices)
    if rows is None and n > 1:
        xs, ys, back = x, y, None
    elif rows is None:  # one row: sent as two
        xs, slots, ys, back = torch.cat((x, x)), slots.repeat(2), y[:, :width].repeat(2, 1), y[:, :width]
    else:  # the rows with an adapter, gathered (one: twice), computed on a copy and written back
        idx = rows if n > 1 else rows.repeat(2)
        slots = slots if n > 1 else slots.repeat(2)
        xs, ys, back = x.index_select(0, idx), y[:, :width].index_select(0, idx), None
    aby, offset = [], 0
    for a, b, size in zip(lora_a, lora_b, output_slices):
        aby += [a, mirror(b), ys[:, offset:offset + size]]
        offset += size
    xs, slots = xs.contiguous(), slots.contiguous()
    done = False
    if enabled():
        try:
            _rows_kernel()(xs, slots, ranks_t, scale, *aby)
            done = True
        except Exception as exc:  # no compiler, an inductor bug: stay correct (and invariant), only slower
            _fail(exc)
    if not done:
        for i in range(0, xs.shape[0], EAGER_ROWS):
            _rows_add(xs[i:i + EAGER_ROWS], slots[i:i + EAGER_ROWS], ranks_t, scale,
                      *[t[i:i + EAGER_ROWS] if j % 3 == 2 else t for j, t in enumerate(aby)])
    if back is not None:
        back.copy_(ys[:1])
    elif rows is not None:
        y[:, :width].index_copy_(0, rows, ys[:n])


def apply_gather(y: torch.Tensor, x: torch.Tensor, rows: torch.Tensor | None, slots: torch.Tensor,
                 lora_a: tuple[torch.Tensor, ...], lora_b: tuple[torch.Tensor, ...], scale: float,
                 output_slices: tuple[int, ...], rank: int | None = None) -> None:
    """``y[row, slice_i] += (x[row] @ A_i[slot].T * scale) @ B_i[slot].T`` for each token row
    (``rows``; None = every row) and its ``slots`` entry, with the slots' first ``rank`` rows
    of A and columns of B (None: all; the rest must be zero padding, :mod:`.ranks`)."""
    full = lora_a[0].shape[-2]
    # at least 2: dynamo specializes a size of 1, and a rank-1 warm-up would then compile again
    rank = full if rank is None else min(full, max(rank, 2))
    done = 0
    if enabled() and slots.numel() > 1:  # one token: eager is as fast, and n == 1 would compile again
        done = _apply_compiled(y, x, rows, slots, lora_a, lora_b, scale, output_slices, rank)
        if done == len(lora_a):
            return
    _apply_eager(y, x, rows, slots, lora_a[done:], lora_b[done:], scale, output_slices[done:], rank,
                 offset=sum(output_slices[:done]))
