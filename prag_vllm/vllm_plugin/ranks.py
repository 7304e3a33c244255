"""The rank each LoRA slot really holds, so that the LoRA ops skip the slot's zero padding.

vLLM sizes every slot for ``max_lora_rank``, which must be 1, 8, 16, 32...: the merged
adapter of the top-3 rank-2 documents (rank 6) sits in a rank-8 slot whose last two rows
of ``A`` and columns of ``B`` are zeros, and an adapter-less request's zero adapter (rank 1)
in the same slot size. Computing with the padding is exact but costs 8/6 of the work.

``set_lora``/``reset_lora`` of every LoRA layer class are wrapped (:mod:`.gather` installs
the wrapper) to record the rank written per layer and slot: the rows of ``A`` the adapter
has, 0 after a reset. A write that was not recorded (one of the layer's stacked tensors'
version counters moved without a note) makes every slot of that layer count as full rank
again until it is written through the wrapper: the ops then do what they did before.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch


@dataclass
class _Ranks:
    owner: weakref.ref
    """The layer's first stacked ``A`` (its id is the key; an id can be reused)."""
    versions: tuple[int, ...]
    """Version counters of the layer's stacked ``A`` and ``B`` tensors that ``ranks`` accounts for."""
    ranks: list[int]
    """Rank held by each slot."""


_RANKS: dict[int, _Ranks] = {}


def versions(stacked_a: tuple[torch.Tensor, ...], stacked_b: tuple[torch.Tensor, ...]) -> tuple[int, ...]:
    return tuple(t._version for t in stacked_a) + tuple(t._version for t in stacked_b)


def rank_of(lora_a) -> int | None:
    """Rows of an adapter's ``A`` as ``set_lora`` gets it (a tensor, a
    :class:`~.parts.RankParts`, or a list of them per output slice, None for a slice the
    adapter lacks); None when the shape is not known."""
    if lora_a is None:
        return 0
    if isinstance(lora_a, (list, tuple)):
        ranks = [rank_of(a) for a in lora_a]
        return None if any(r is None for r in ranks) else max(ranks, default=0)
    shape = getattr(lora_a, "shape", None)
    return int(shape[0]) if shape is not None and len(shape) == 2 else None


def _full(stacked_a: tuple[torch.Tensor, ...]) -> int:
    return stacked_a[0].shape[-2]


def note(stacked_a: tuple[torch.Tensor, ...], stacked_b: tuple[torch.Tensor, ...], index: int,
         rank: int | None, versions_before: tuple[int, ...]) -> None:
    """Record that slot ``index`` of a layer now holds ``rank`` (None: unknown, full)."""
    if not stacked_a:
        return
    full = _full(stacked_a)
    entry = _RANKS.get(id(stacked_a[0]))
    if entry is None or entry.owner() is not stacked_a[0]:
        entry = _RANKS[id(stacked_a[0])] = _Ranks(weakref.ref(stacked_a[0]), versions_before,
                                                  [full] * stacked_a[0].shape[0])
    if any(seen < before for seen, before in zip(entry.versions, versions_before)):
        # a write we did not see: nothing is known any more (a nested write we did see, like
        # vLLM's set_lora calling reset_lora, leaves the counters at or past ``versions_before``)
        entry.ranks = [full] * len(entry.ranks)
    entry.ranks[index] = full if rank is None else min(rank, full)
    entry.versions = versions(stacked_a, stacked_b)


def slot_ranks(stacked_a: tuple[torch.Tensor, ...], stacked_b: tuple[torch.Tensor, ...],
               current: tuple[int, ...] | None = None) -> list[int] | None:
    """Rank of each slot of this layer, or None when not known (use the full rank);
    ``current``: :func:`versions` of the tensors, if the caller has it already."""
    entry = _RANKS.get(id(stacked_a[0]))
    if current is None:
        current = versions(stacked_a, stacked_b)
    if entry is None or entry.owner() is not stacked_a[0] or entry.versions != current:
        return None
    return entry.ranks
