"""AdamW over stacked per-document parameters, one independent optimizer per slot.

Every parameter is a stack ``[S, ...]`` whose slice ``[d]`` belongs to document slot
``d``. ``step(slots)`` applies exactly ``torch.optim.AdamW``'s (single-tensor) update to
the listed slots only, each with its own step count for the bias correction; slots not
listed are left bit-for-bit untouched (a plain ``torch.optim.AdamW`` over the stacks
would still move them through their momentum). ``reset(slots)`` gives a slot a fresh
state, as a new optimizer per document does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

logger = logging.getLogger(__name__)


class SlotAdamW:
    """Vectorised per-slot AdamW (decoupled weight decay, no AMSGrad)."""

    def __init__(self, params: Sequence[torch.nn.Parameter], slots: int, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01):
        self.params = list(params)
        if any(p.shape[0] != slots for p in self.params):
            raise ValueError(f"every parameter must be stacked over {slots} slots")
        self.slots, self.lr, self.betas, self.eps, self.weight_decay = slots, lr, betas, eps, weight_decay
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.steps = [0] * slots
        """Optimizer steps taken by each slot since its last reset."""

    def reset(self, slots: Sequence[int]) -> None:
        """Fresh optimizer state for ``slots`` (a new document enters them)."""
        idx = torch.as_tensor(list(slots), dtype=torch.long)
        for m, v in zip(self.exp_avg, self.exp_avg_sq):
            m.index_fill_(0, idx, 0.0)
            v.index_fill_(0, idx, 0.0)
        for s in slots:
            self.steps[s] = 0

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, slots: Sequence[int]) -> None:
        """One AdamW step for each slot in ``slots`` (each at its own step count)."""
        slots = sorted(set(slots))
        if not slots:
            return
        for s in slots:
            self.steps[s] += 1
        beta1, beta2 = self.betas
        # per-slot scalars, computed in Python floats as torch does, then cast like a scalar operand
        bc1 = [1 - beta1 ** self.steps[s] for s in slots]
        bc2_sqrt = [(1 - beta2 ** self.steps[s]) ** 0.5 for s in slots]
        neg_step = [-(self.lr / b) for b in bc1]
        everyone = len(slots) == self.slots
        idx = torch.as_tensor(slots, dtype=torch.long)
        for p, m_all, v_all in zip(self.params, self.exp_avg, self.exp_avg_sq):
            shape = (len(slots),) + (1,) * (p.dim() - 1)
            c2 = torch.tensor(bc2_sqrt, dtype=p.dtype).view(shape)
            ns = torch.tensor(neg_step, dtype=p.dtype).view(shape)
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            if everyone:
                param, g, m, v = p.data, grad, m_all, v_all
            else:
                param, g, m, v = (t.index_select(0, idx) for t in (p.data, grad, m_all, v_all))
            if self.weight_decay != 0:
                param.mul_(1 - self.lr * self.weight_decay)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / c2).add_(self.eps)
            param.add_(ns * m / denom)  # addcdiv_(m, denom, value=-step_size) evaluates (value * m) / denom
            if not everyone:
                p.data.index_copy_(0, idx, param)
                m_all.index_copy_(0, idx, m)
                v_all.index_copy_(0, idx, v)
