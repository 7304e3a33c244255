"""Slot-major LoRA buffers: a merged adapter activated in a few large copies.

vLLM gives every LoRA layer its own stacked buffers (``slots x 1 x rank x in`` for A,
``slots x 1 x out x rank`` for B, one per output slice), so activating an FFN adapter of
Qwen2.5-0.5B writes 144 separate slots (24 layers x gate, up, down x A, B): 144 ops, each
paying torch's dispatch on top of its bytes, plus Python around every layer's
``set_lora``. On the AVX2 machine that was ~7.5 ms of the ~15.5 ms a cold adapter took to
be ready (``docs/notes/lora_cpu.md``).

Here, once vLLM has created its LoRA layers, the buffers of every layer of one projection
kind (``gate_proj``, ``up_proj``, ``down_proj``) are moved into one *pool* laid out slot
first: ``slots x layers x rank x in`` (A) and ``slots x layers x out x rank`` (B). Each
layer's stacked tensor becomes a strided tensor on the pool's storage (same shape, same
values; vLLM and the LoRA ops read and write it as before) with its own version counter.
A document's factors are kept stacked the same way (:func:`stack_document`:
``layers x r x in``, ``layers x out x r``), so its share of a slot, for every layer at once,
is one strided copy: a merged adapter of 3 documents is ~24 copies instead of 144, and no
per-layer Python (:meth:`SlotPools.write`). B is copied as machine words where a document's
``r`` numbers of a row are one (rank 2 in float32: one ``int64``).

The caches that follow slot writes (:mod:`.ranks`, the gather kernels' mirror of B, the
float32 decode copies) watch each layer tensor's version counter; :meth:`SlotPools.note`
bumps those counters and records the slot exactly as the ``set_lora`` wrapper would.

Used only when every LoRA layer is a plain or merged linear layer without tensor
parallelism and the adapter is a merge manifest whose documents name the same modules;
anything else activates through vLLM's per-layer ``set_lora``, on the same memory.
"""

from __future__ import annotations

import functools
import logging
import re
import weakref
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from prag_vllm.vllm_plugin import gather, patching, ranks
from prag_vllm.vllm_plugin.parts import _WORDS, as_words
from prag_vllm.vllm_plugin.patching import Patcher

logger = logging.getLogger(__name__)

_DIGITS = re.compile(r"(\d+)")


def natural(name: str) -> tuple:
    """Sort key with numbers compared as numbers (``layers.2`` before ``layers.10``)."""
    return tuple(int(t) if t.isdigit() else t for t in _DIGITS.split(name))


class DocStack(NamedTuple):
    """One document's factors of one projection kind, every layer stacked."""

    names: tuple[str, ...]
    """Module paths, in :func:`natural` order (the order of the layers below)."""
    a: torch.Tensor
    """``layers x r x in``."""
    b: torch.Tensor
    """``layers x out x r`` (scaling folded in, as the document cache keeps it)."""
    words: torch.Tensor | None
    """``b`` with each row as one machine word (``layers x out``), None where a row is not one."""


def stack_document(weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
                   ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, DocStack]]:
    """``weights`` (module path -> (A, B)) stacked per projection kind (the path's last name):
    the same values as views of one tensor per kind and factor, and the :class:`DocStack`
    per kind. A kind whose modules differ in shape or dtype is left as it was (and has no
    stack)."""
    groups: dict[str, list[str]] = {}
    for m in weights:
        groups.setdefault(m.rsplit(".", 1)[-1], []).append(m)
    out, stacks = dict(weights), {}
    for kind, names in groups.items():
        names.sort(key=natural)
        pairs = [weights[m] for m in names]
        if any(a.dim() != 2 or b.dim() != 2 for a, b in pairs) or len({(a.shape, b.shape, a.dtype, b.dtype)
                                                                        for a, b in pairs}) != 1:
            continue
        a = torch.stack([p[0] for p in pairs])
        b = torch.stack([p[1] for p in pairs])
        words = as_words(b.view(-1, b.shape[2]))
        words = None if words is None else words.view(b.shape[0], b.shape[1])
        for i, m in enumerate(names):
            out[m] = (a[i], b[i])
        stacks[kind] = DocStack(tuple(names), a, b, words)
    return out, stacks


@dataclass
class _Pool:
    """The buffers of one projection kind, every layer's slots side by side, slot first."""

    kind: str
    names: tuple[str, ...]
    """Documents' module paths of the layers, in :func:`natural` order."""
    a: torch.Tensor
    """``slots x layers x rank x in``."""
    b: torch.Tensor
    """``slots x layers x out x rank``."""
    words: dict[int, torch.Tensor] = field(default_factory=dict)
    """Document rank -> ``b`` seen as words of that many numbers (``slots x layers x out x rank/r``)."""

    def b_words(self, r: int, dtype: torch.dtype) -> torch.Tensor | None:
        if self.b.dtype != dtype or self.b.shape[-1] % r:
            return None
        if r not in self.words:
            word = _WORDS.get(r * self.b.element_size())
            if word is None:
                return None
            self.words[r] = self.b.view(word)
        return self.words[r]


def _strided_on(pool: torch.Tensor, layer: int) -> torch.Tensor:
    """Layer ``layer``'s ``slots x 1 x ...`` tensor on ``pool``'s memory, with its own version
    counter (``set_``, not a view: a write to one layer must not look like a write to all)."""
    shape = (pool.shape[0], 1, *pool.shape[2:])
    stride = (pool.stride(0), pool.stride(1), *pool.stride()[2:])
    offset = pool.storage_offset() + layer * pool.stride(1)
    return torch.empty(0, dtype=pool.dtype, device=pool.device).set_(pool.untyped_storage(), offset, shape, stride)


def _poolable(module) -> bool:
    a, b = getattr(module, "lora_a_stacked", None), getattr(module, "lora_b_stacked", None)
    if not isinstance(a, (tuple, list)) or not isinstance(b, (tuple, list)):
        return False
    n = getattr(module, "n_slices", None)
    return (getattr(module, "tp_size", 1) == 1 and n == len(a) == len(b) and n > 0
            and all(t.dim() == 4 and t.shape[1] == 1 and not t.is_inference() for t in (*a, *b))
            and getattr(getattr(type(module), "set_lora", None), "_prag_by_parts", False))


class SlotPools:
    """The pools of one LoRA model manager and the layers on them."""

    def __init__(self, pools: dict[str, _Pool], modules: list):
        self.pools = pools
        self.modules = modules
        """Every LoRA layer of the manager (all of them on the pools)."""
        self.rank = next(iter(pools.values())).a.shape[2]
        self.activations = 0
        """Adapters activated through :meth:`write` (a statistic)."""

    def accepts(self, docs: list[dict[str, DocStack]]) -> bool:
        """Whether ``docs`` (each document's stacks) cover exactly the pools' modules, each
        document with one rank for all of them, and fit a slot."""
        if not docs or any(len(d) != len(self.pools) for d in docs):
            return False
        for d in docs:
            if len({s.a.shape[1] for s in d.values()} | {s.b.shape[2] for s in d.values()}) != 1:
                return False
        for kind, pool in self.pools.items():
            for d in docs:
                s = d.get(kind)
                if s is None or s.names != pool.names or s.a.shape[2] != pool.a.shape[3] \
                        or s.b.shape[1] != pool.b.shape[2]:
                    return False
        return sum(next(iter(d.values())).a.shape[1] for d in docs) <= self.rank

    def write(self, index: int, docs: list[dict[str, DocStack]]) -> int:
        """Slot ``index`` := the documents' factors side by side along the rank, zeros after
        them (what vLLM's ``set_lora`` of the concatenated adapter writes, bit for bit);
        returns the rank written. Call :meth:`note` after it."""
        rank = 0
        for kind, pool in self.pools.items():
            stacks = [d[kind] for d in docs]
            a, off = pool.a[index], 0
            for s in stacks:
                r = s.a.shape[1]
                a[:, off:off + r].copy_(s.a)
                off += r
            if off < a.shape[1]:
                a[:, off:].zero_()
            rank = off
            r = stacks[0].b.shape[2]
            words = pool.b_words(r, stacks[0].b.dtype) if all(s.b.shape[2] == r and s.words is not None
                                                              and s.b.dtype == stacks[0].b.dtype for s in stacks) else None
            if words is not None:
                w = words[index]
                for j, s in enumerate(stacks):
                    w[:, :, j].copy_(s.words)
                if len(stacks) < w.shape[2]:
                    w[:, :, len(stacks):].zero_()
                continue
            b, off = pool.b[index], 0
            for s in stacks:
                r = s.b.shape[2]
                b[:, :, off:off + r].copy_(s.b)
                off += r
            if off < b.shape[2]:
                b[:, :, off:].zero_()
        self.activations += 1
        return rank

    def note(self, index: int, rank: int) -> None:
        """Tell the caches that follow slot writes that slot ``index`` of every layer now
        holds ``rank`` (the pool wrote behind the layer tensors' version counters)."""
        layers = [(tuple(m.lora_a_stacked), tuple(m.lora_b_stacked)) for m in self.modules]
        befores = [ranks.versions(sa, sb) for sa, sb in layers]
        torch.autograd.graph.increment_version([t for sa, sb in layers for t in (*sa, *sb)])
        for (sa, sb), before in zip(layers, befores):
            gather.note_slot(sa, sb, index, rank, before)


def build(modules: dict, packed: dict[str, list[str]]) -> SlotPools | None:
    """Move the stacked buffers of ``modules`` (a manager's module path -> LoRA layer) into
    slot-major pools, one per projection kind (``packed``: vLLM's packed module name -> the
    names of its slices); None (nothing changed) unless every layer can be. Until it returns
    the old buffers and the pools both exist: twice the LoRA slots' memory for a moment, at
    engine start (Qwen2.5-0.5B, 100 float32 rank-8 slots: 1.3 GB)."""
    if not modules or not all(_poolable(m) for m in modules.values()):
        return None
    entries: dict[str, list[tuple[str, object, int]]] = {}
    for path, module in modules.items():
        prefix, _, leaf = path.rpartition(".")
        subs = packed.get(leaf, [leaf])
        if len(subs) != module.n_slices:
            return None
        for i, sub in enumerate(subs):
            entries.setdefault(sub, []).append((f"{prefix}.{sub}" if prefix else sub, module, i))
    for items in entries.values():
        shapes = {(m.lora_a_stacked[i].shape, m.lora_b_stacked[i].shape, m.lora_a_stacked[i].dtype,
                   m.lora_b_stacked[i].dtype, m.lora_a_stacked[i].device) for _, m, i in items}
        if len(shapes) != 1 or len({n for n, _, _ in items}) != len(items):
            return None
    pools, new = {}, {id(m): (list(m.lora_a_stacked), list(m.lora_b_stacked), m) for m in modules.values()}
    with torch.inference_mode(False), torch.no_grad():
        for kind, items in entries.items():
            items.sort(key=lambda e: natural(e[0]))
            a0, b0 = items[0][1].lora_a_stacked[items[0][2]], items[0][1].lora_b_stacked[items[0][2]]
            n = len(items)
            pool_a = torch.empty((a0.shape[0], n, *a0.shape[2:]), dtype=a0.dtype, device=a0.device)
            pool_b = torch.empty((b0.shape[0], n, *b0.shape[2:]), dtype=b0.dtype, device=b0.device)
            for layer, (_, m, i) in enumerate(items):
                pool_a[:, layer].copy_(m.lora_a_stacked[i][:, 0])
                pool_b[:, layer].copy_(m.lora_b_stacked[i][:, 0])
                new[id(m)][0][i] = _strided_on(pool_a, layer)
                new[id(m)][1][i] = _strided_on(pool_b, layer)
            pools[kind] = _Pool(kind, tuple(name for name, _, _ in items), pool_a, pool_b)
    for a, b, m in new.values():
        m.lora_a_stacked, m.lora_b_stacked = tuple(a), tuple(b)
    logger.info("prag: LoRA slots of %d layers in %d slot-major pools (%s)", len(modules), len(pools),
                ", ".join(f"{k}: {len(p.names)} layers" for k, p in pools.items()))
    return SlotPools(pools, list(modules.values()))


def _activate(manager, pools: SlotPools, lora_model, docs: list[dict[str, DocStack]]) -> bool:
    """vLLM's ``LoRAModelManager.activate_adapter`` (first free slot, bookkeeping) with the
    slot written by :meth:`SlotPools.write` instead of every layer's ``set_lora``."""
    index = next((i for i, held in enumerate(manager.lora_index_to_id) if held is None), None)
    if index is None:
        raise ValueError("No free lora slots")
    manager._active_adapters[lora_model.id] = None
    manager.lora_index_to_id[index] = lora_model.id
    logger.debug("Activating LoRA %d in slot %d through the slot pools", lora_model.id, index)
    pools.note(index, pools.write(index, docs))
    return True


def install(patcher: Patcher | None = None) -> None:
    """Build the pools when vLLM creates a manager's LoRA layers, and activate merge
    manifests' adapters through them (idempotent; ``PRAG_LORA_SLOT_POOLS=0``: not at all)."""
    from prag_vllm.vllm_plugin import settings

    if settings.SLOT_POOLS.get() == "0":
        return
    from vllm.lora.model_manager import LoRAModelManager
    from vllm.v1.worker.worker_base import WorkerBase

    p = patching.default(patcher)
    if getattr(LoRAModelManager, "_prag_pools", False):
        return
    create, activate = LoRAModelManager._create_lora_modules, LoRAModelManager.activate_adapter
    pack = LoRAModelManager._create_merged_loras_inplace

    @functools.wraps(create)
    def _create_lora_modules(self):
        global _CURRENT
        create(self)
        self._prag_slot_pools = None
        try:
            self._prag_slot_pools = build(self.modules, dict(getattr(self, "packed_modules_mapping", {}) or {}))
        except Exception as exc:  # nothing is changed before build's last step: vLLM's buffers stay
            logger.warning("prag: LoRA slot pools not built (%s: %s); adapters activate layer by layer",
                           type(exc).__name__, exc)
        _CURRENT = None if self._prag_slot_pools is None else weakref.ref(self._prag_slot_pools)

    @functools.wraps(activate)
    def activate_adapter(self, lora_id: int) -> bool:
        if lora_id not in self._active_adapters and lora_id in self._registered_adapters:
            lora_model = self._registered_adapters[lora_id]
            docs = getattr(lora_model, "_prag_docs", None)
            pools = getattr(self, "_prag_slot_pools", None)
            if docs is not None and pools is not None and pools.accepts(docs):
                return _activate(self, pools, lora_model, docs)
            if docs is not None and not lora_model.loras:  # built for pools (merged.pooled_model) that cannot take it
                raise ValueError(f"LoRA {lora_id}: a merged adapter made for the slot pools, which are not in use "
                                 f"here; it has no factors of its own")
        return activate(self, lora_id)

    @functools.wraps(pack)
    def _create_merged_loras_inplace(self, lora_model) -> None:
        if getattr(lora_model, "_prag_docs", None) is not None and not lora_model.loras:
            return  # a pooled model (merged.pooled_model): no factors to pack
        pack(self, lora_model)

    p.set(LoRAModelManager, "_create_lora_modules", _create_lora_modules)
    p.set(LoRAModelManager, "_create_merged_loras_inplace", _create_merged_loras_inplace)
    p.set(LoRAModelManager, "activate_adapter", activate_adapter)
    p.set(LoRAModelManager, "_prag_pools", True)
    # a worker RPC (``collective_rpc("prag_pool_state")``): whether pools are in use here
    p.set(WorkerBase, "prag_pool_state", pool_state)


_CURRENT: weakref.ref | None = None
"""The pools of this process's last LoRA manager (vLLM's worker has one)."""


def current() -> SlotPools | None:
    """This process's :class:`SlotPools`, if its LoRA manager has them."""
    return None if _CURRENT is None else _CURRENT()


def pool_state(worker) -> dict:
    """Worker RPC: the pools of the worker's LoRA manager (``None`` values where there are none)."""
    manager = getattr(getattr(getattr(worker, "model_runner", None), "lora_manager", None), "_adapter_manager", None)
    pools = getattr(manager, "_prag_slot_pools", None)
    if pools is None:
        return {"pools": None, "activations": None}
    return {"pools": {k: len(p.names) for k, p in pools.pools.items()}, "activations": pools.activations}
