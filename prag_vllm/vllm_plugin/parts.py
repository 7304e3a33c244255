"""Merged adapters kept as their documents' factors, copied straight into vLLM's LoRA slots.

A merged adapter is ``A = [A_1; ...; A_k]`` and ``B = [s_1 B_1, ..., s_k B_k]``
(:mod:`prag_vllm.merge`). vLLM's worker only ever copies a LoRA's A and B into one slot
of its stacked buffers (``set_lora``, when the adapter is activated). So a merged adapter
loaded from a manifest (:mod:`.merged`) does not build A and B: each is a
:class:`RankParts`, the documents' own tensors (shared with the worker's document cache),
and ``set_lora`` writes each slot once, with ``torch.cat(parts + [zero padding], out=slot)``
(vLLM zeroes the slot, then copies A and B into it). The slot ends up bit for bit what the
concatenated tensors would give (writing into a slot of another dtype converts exactly as
``Tensor.to`` does).

Why: each merged adapter vLLM keeps (up to ``max_cpu_loras``) used to hold its own
concatenated copy, ~4.7 MB for a rank-6 FFN adapter of Qwen2.5-0.5B. Fresh memory is
paid in page faults: in vLLM's worker, once a few adapters were held, every ``add_lora``
took 1000-2500 minor faults and 20-60 ms of system time (``docs/notes/lora_cpu.md``). With
parts, a loaded adapter costs no tensor memory and no concatenation.

:func:`install` wraps ``set_lora`` of every vLLM LoRA layer class: plain and merged
(gate/up) linear layers without tensor parallelism, whose factors span the slot's width,
take that path; any other
layer gets the concatenated tensors (:meth:`RankParts.materialize`) and runs vLLM's own
code, so a :class:`RankParts` never reaches code that expects a tensor.
"""

from __future__ import annotations

import functools
import logging

import torch

from prag_vllm.vllm_plugin import patching
from prag_vllm.vllm_plugin.patching import Patcher

logger = logging.getLogger(__name__)


class RankParts:
    """One factor of a merged LoRA as the documents' factors, concatenated along the rank
    dimension (``dim`` 0: A ``[r_j, in]`` stacked by rows; ``dim`` 1: B ``[out, r_j]`` by columns).

    It stands in for the concatenated tensor where vLLM builds a ``LoRAModel``
    (``from_lora_tensors``, packing gate/up, ``optimize``); nothing in it is ever written to.
    """

    __slots__ = ("parts", "dim", "dtype", "words")

    def __init__(self, parts: list[torch.Tensor], dim: int, dtype: torch.dtype | None = None):
        if dim not in (0, 1) or not parts or any(p.dim() != 2 for p in parts):
            raise ValueError("RankParts needs 2-D parts and dim 0 or 1")
        other = 1 - dim
        if len({p.shape[other] for p in parts}) != 1 or len({p.device for p in parts}) != 1:
            raise ValueError(f"parts differ in size along dim {other} or in device: "
                             f"{[tuple(p.shape) for p in parts]}")
        self.parts = list(parts)
        self.dim = dim
        self.dtype = dtype or parts[0].dtype
        """The dtype the factor is loaded as (each part is converted when it is copied)."""
        self.words = None
        """B only: each part's rows as machine words (:func:`as_words`), computed once by
        whoever keeps the parts (the worker's document cache); None: not given."""

    @classmethod
    def trusted(cls, parts: list[torch.Tensor], dim: int, dtype: torch.dtype | None = None,
                words: list[torch.Tensor] | None = None) -> RankParts:
        """Like the constructor, for parts the caller has checked already (2-D, same size
        along the other dim, one device): a merge manifest's documents, 144 factors per
        adapter of Qwen2.5-0.5B, built without re-checking each."""
        self = object.__new__(cls)
        self.parts, self.dim, self.dtype = parts, dim, dtype or parts[0].dtype
        self.words = None
        if words is not None and all(w is not None for w in words) and len({w.dtype for w in words}) == 1 \
                and len({p.dtype for p in parts}) == 1:
            self.words = words
        return self

    @property
    def shape(self) -> torch.Size:
        rank = sum(p.shape[self.dim] for p in self.parts)
        other = self.parts[0].shape[1 - self.dim]
        return torch.Size((rank, other) if self.dim == 0 else (other, rank))

    @property
    def device(self) -> torch.device:
        return self.parts[0].device

    def to(self, device=None, dtype: torch.dtype | None = None, **kwargs) -> RankParts | torch.Tensor:
        """Same parts with another target dtype; another device gets a real tensor."""
        if device is not None and torch.device(device) != self.device:
            return self.materialize().to(device=device, **kwargs)
        if dtype is None or dtype == self.dtype:
            return self
        return RankParts(self.parts, self.dim, dtype)

    def pin_memory(self) -> RankParts:
        """Kept as is: parts are copied into the slot buffers once, when activated."""
        return self

    def __imul__(self, scale: float) -> RankParts:
        """``lora_b *= scaling`` (vLLM's ``optimize``): scaled copies, the shared parts untouched."""
        return RankParts([p.to(self.dtype) * scale for p in self.parts], self.dim, self.dtype)

    def materialize(self) -> torch.Tensor:
        """The concatenated tensor, in :attr:`dtype`."""
        return torch.cat([p.to(self.dtype) for p in self.parts], dim=self.dim)


def has_parts(x) -> bool:
    return isinstance(x, RankParts) or (isinstance(x, (list, tuple)) and any(isinstance(i, RankParts) for i in x))


def materialize(x):
    """``x`` with every :class:`RankParts` replaced by its concatenated tensor."""
    if isinstance(x, RankParts):
        return x.materialize()
    if isinstance(x, (list, tuple)):
        return type(x)(materialize(i) for i in x)
    return x


def _pieces(factor: torch.Tensor | RankParts | None) -> list[torch.Tensor]:
    return [] if factor is None else factor.parts if isinstance(factor, RankParts) else [factor]


_ZEROS: dict[tuple, torch.Tensor] = {}
"""Zero padding by (rows, cols, dtype, device); only ever read (a handful of shapes per model)."""


def _zeros(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros for the rank rows/columns a merged adapter does not fill."""
    key = (rows, cols, dtype, device)
    if key not in _ZEROS:
        _ZEROS[key] = torch.zeros(rows, cols, dtype=dtype, device=device)
    return _ZEROS[key]


def _fits(slot: torch.Tensor, factor, dim: int) -> bool:
    """The factor spans the slot's full width (rows of A, columns of B) within its rank."""
    if isinstance(factor, RankParts) and factor.dim == dim:  # its parts agree along the other dim
        parts = factor.parts
        return (sum(p.shape[dim] for p in parts) <= slot.shape[dim]
                and parts[0].shape[1 - dim] == slot.shape[1 - dim])
    pieces = _pieces(factor)
    return (sum(p.shape[dim] for p in pieces) <= slot.shape[dim]
            and all(p.shape[1 - dim] == slot.shape[1 - dim] for p in pieces))


_WORDS = {2: torch.int16, 4: torch.int32, 8: torch.int64}
"""Integer dtype of a B row's rank columns of one document, by their size in bytes."""


def as_words(b: torch.Tensor) -> torch.Tensor | None:
    """A row-major B (``out x r``) as ``out`` machine words, one per row (rank 2 in float32:
    8 bytes, ``int64``), sharing its memory; None where a row is no word (2, 4 or 8 bytes)."""
    word = _WORDS.get(b.shape[1] * b.element_size()) if b.dim() == 2 else None
    if word is None or b.stride() != (b.shape[1], 1):
        return None
    return b.view(word).view(b.shape[0])


def _fill_b_by_words(slot: torch.Tensor, factor, pieces: list[torch.Tensor]) -> bool:
    """B (``out x rank``) from documents of one rank ``r`` in the slot's dtype, row-major:
    each document's ``r`` numbers of a row are one machine word (rank 2 in float32: 8
    bytes), so the slot, seen as words, is the documents' columns stacked side by side,
    one ``torch.stack`` (bit for bit the same as the ``torch.cat`` along the rank). A
    ``cat`` of 2-wide columns copies 8 bytes at a time; this moves whole words: a gate/up
    B slot of Qwen2.5-0.5B from three rank-2 documents, float32, 58 -> 20 µs warm, and a
    whole activation's slot writes 6.8 -> 2.6 ms (probes, one process, AVX2 machine,
    ``docs/notes/lora_cpu.md``). False (nothing written) where the layout does not allow it."""
    words = factor.words if isinstance(factor, RankParts) else None
    if words is None:  # not prepared by the document cache: only documents of one rank and the slot's dtype
        if any(p.dtype != slot.dtype or p.shape[1] != pieces[0].shape[1] for p in pieces):
            return False
        words = [as_words(p) for p in pieces]
        if words[0] is None:
            return False
    elif pieces[0].dtype != slot.dtype:  # prepared words: one rank and one dtype for all parts
        return False
    r = pieces[0].shape[1]
    rows, width = slot.shape
    pad = width - r * len(pieces)
    word = words[0].dtype
    if pad < 0 or pad % r or slot.stride() != (width, 1) or word.itemsize != r * slot.element_size():
        return False
    if pad:
        words = [*words, *[_zeros(rows, 1, word, slot.device).view(rows)] * (pad // r)]
    torch.stack(words, dim=1, out=slot.view(word))
    return True


def _fill(slot: torch.Tensor, factor, dim: int) -> None:
    """``slot`` := the factor's parts side by side along ``dim`` (the rank), zeros after them:
    vLLM's ``reset_lora`` + ``copy_`` in one op writing the slot in place."""
    pieces = factor.parts if isinstance(factor, RankParts) else _pieces(factor)
    if not pieces:
        slot.zero_()
        return
    if dim == 1 and _fill_b_by_words(slot, factor, pieces):
        return
    pad = slot.shape[dim] - sum(p.shape[dim] for p in pieces)
    if pad:
        shape = (pad, slot.shape[1]) if dim == 0 else (slot.shape[0], pad)
        pieces = [*pieces, _zeros(*shape, pieces[0].dtype, pieces[0].device)]
    if all(p.dtype == slot.dtype for p in pieces):
        torch.cat(pieces, dim=dim, out=slot)
    elif dim == 0:  # a float32 engine's slot from bf16 documents: concatenated, then converted in one copy
        slot.copy_(torch.cat(pieces, dim=0))
    else:  # B: rank columns as rows (contiguous for column-major parts), converted in one transposing copy
        slot.copy_(torch.cat([p.t() for p in pieces], dim=0).t())


def _slot(layer, stacked: torch.Tensor, index: int) -> torch.Tensor:
    """``stacked[index, 0]``, the view kept (on ``layer``, so it goes with the model) from the
    first time it was asked for: indexing a 4-D tensor costs ~3 µs on this machine, 144
    times per activation of an FFN adapter of Qwen2.5-0.5B."""
    views = layer.__dict__.get("_prag_slot_views")
    if views is None:
        views = layer.__dict__["_prag_slot_views"] = {}
    entry = views.get(id(stacked))
    if entry is None or entry[0] is not stacked:
        entry = views[id(stacked)] = (stacked, [None] * stacked.shape[0])
    view = entry[1][index]
    if view is None:
        view = entry[1][index] = stacked[index, 0]
    return view


def set_lora_by_parts(layer, index: int, lora_a, lora_b) -> bool:
    """vLLM's ``set_lora`` of a linear LoRA layer without tensor parallelism, each slot written
    once from the parts; False (nothing written) where that layout does not apply."""
    a_list = lora_a if isinstance(lora_a, list) else [lora_a]
    b_list = lora_b if isinstance(lora_b, list) else [lora_b]
    n = getattr(layer, "n_slices", None)
    if getattr(layer, "tp_size", 1) != 1 or not len(a_list) == len(b_list) == n == len(layer.lora_a_stacked):
        return False
    slots = [(_slot(layer, layer.lora_a_stacked[i], index), _slot(layer, layer.lora_b_stacked[i], index))
             for i in range(n)]
    if not all(_fits(sa, a, 0) and _fits(sb, b, 1) for (sa, sb), a, b in zip(slots, a_list, b_list)):
        return False
    for (sa, sb), a, b in zip(slots, a_list, b_list):
        _fill(sa, a, 0)
        _fill(sb, b, 1)
    return True


def _wrap(original, by_parts: bool):
    @functools.wraps(original)
    def set_lora(self, index, lora_a, lora_b, *args, **kwargs):
        if has_parts(lora_a) or has_parts(lora_b):
            if by_parts and not args and not kwargs and set_lora_by_parts(self, index, lora_a, lora_b):
                return None
            lora_a, lora_b = materialize(lora_a), materialize(lora_b)
        return original(self, index, lora_a, lora_b, *args, **kwargs)

    set_lora._prag_parts = True
    set_lora._prag_by_parts = by_parts
    """Whether the layer's slots are plain ``slots x 1 x rank x in`` / ``out x rank`` buffers
    written by vLLM's linear ``set_lora`` (what :mod:`.pools` relies on)."""
    return set_lora


def _subclasses(cls) -> list[type]:
    out, todo = [], [cls]
    while todo:
        c = todo.pop()
        out.append(c)
        todo.extend(c.__subclasses__())
    return out


def install(patcher: Patcher | None = None) -> None:
    """Wrap ``set_lora`` of every vLLM LoRA layer class (idempotent)."""
    import vllm.lora.layers  # noqa: F401  (imports every layer class)
    from vllm.lora.layers.base import BaseLayerWithLoRA
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.lora.layers.column_parallel_linear import MergedColumnParallelLinearWithLoRA

    p = patching.default(patcher)
    known = {BaseLinearLayerWithLoRA.__dict__["set_lora"], MergedColumnParallelLinearWithLoRA.__dict__["set_lora"]}
    for cls in _subclasses(BaseLayerWithLoRA):
        fn = cls.__dict__.get("set_lora")
        if fn is None or getattr(fn, "_prag_parts", False):
            continue
        p.set(cls, "set_lora", _wrap(fn, by_parts=fn in known))
    logger.debug("prag: merged adapters are copied into LoRA slots by document")
