"""Stacked per-document LoRA on a model's FFN Linear layers (many documents, one forward).

Each wrapped ``nn.Linear`` holds the LoRA factors of ``S`` documents ("slots") stacked as
``A [S, r, in]`` and ``B [S, out, r]`` (PEFT's layout per slot). Before a forward pass the
trainer tells the shared :class:`SlotRouter` which slot each batch row belongs to; each
row's update then uses only its own document's factors:

    y[n] = W x[n] + (alpha / r) · (x[n] Aᵀ[slot[n]]) Bᵀ[slot[n]]

computed with two batched matmuls (``torch.bmm``) on the gathered factors. The
arithmetic is PEFT's (``result + lora_B(lora_A(x)) * scaling``), so a row's output and
its gradients equal those of a one-document PEFT model up to float rounding, and the
gradient of slot ``d`` comes only from rows of slot ``d``.

Merge-aware training (:mod:`prag_vllm.training.partners`) adds frozen partner factors to
a row's own, ranks concatenated as in :func:`prag_vllm.merge.merge_adapters`, so the row
sees the exact merge of its document's adapter with its partners'.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

logger = logging.getLogger(__name__)


class SlotRouter:
    """Which slot (document) each row of the current batch trains; shared by all layers."""

    def __init__(self) -> None:
        self.rows: torch.Tensor | None = None
        """``[N]`` slot index per batch row, set by the trainer before each forward."""
        self.bypass: bool = False
        """True: every layer computes the frozen base model alone (a distillation teacher)."""
        self.partners: torch.Tensor | None = None
        """``[N, n]`` merge-aware training: per batch row, the partner adapters merged into its
        slot's (rows of every layer's ``partner_A``/``partner_B``); None: none."""


class StackedLoraLinear(nn.Module):
    """A frozen ``nn.Linear`` plus ``S`` independent rank-``r`` LoRAs, one per slot."""

    def __init__(self, base: nn.Linear, slots: int, rank: int, alpha: float, router: SlotRouter):
        super().__init__()
        self.base_layer = base
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.router = router
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.zeros(slots, rank, base.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(slots, base.out_features, rank, device=dev))
        self.partner_A: torch.Tensor | None = None
        """Frozen partner factors ``[M, r, in]`` (merge-aware training), same scaling as the slots."""
        self.partner_B: torch.Tensor | None = None
        """Frozen partner factors ``[M, out, r]``."""

    def reset_slot(self, slot: int, init: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """PEFT's default init (A Kaiming-uniform from the global RNG, B zero), or copy ``init``."""
        with torch.no_grad():
            if init is None:
                nn.init.kaiming_uniform_(self.lora_A.data[slot], a=math.sqrt(5))
                self.lora_B.data[slot].zero_()
            else:
                self.lora_A.data[slot].copy_(init[0].float())
                self.lora_B.data[slot].copy_(init[1].float())

    def factors(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of one slot's (A ``[r, in]``, B ``[out, r]``)."""
        return self.lora_A.detach()[slot].clone(), self.lora_B.detach()[slot].clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.router.bypass:
            return result
        rows = self.router.rows
        if rows is None:
            raise RuntimeError("StackedLoraLinear: the trainer did not route the batch rows to slots")
        if x.dim() != 3 or x.shape[0] != rows.shape[0]:
            raise RuntimeError(f"StackedLoraLinear: expected [{rows.shape[0]}, L, in] input, got {tuple(x.shape)}")
        a = self.lora_A.index_select(0, rows)  # [N, r, in]
        b = self.lora_B.index_select(0, rows)  # [N, out, r]
        if self.router.partners is not None:  # the exact merge of merge.py: ranks concatenated
            n, k = self.router.partners.shape
            pa = self.partner_A[self.router.partners].reshape(n, k * self.rank, -1)  # [N, k r, in]
            pb = self.partner_B[self.router.partners].permute(0, 2, 1, 3).reshape(n, b.shape[1], k * self.rank)
            a, b = torch.cat([a, pa], dim=1), torch.cat([b, pb], dim=2)
        x = x.to(self.lora_A.dtype)  # as PEFT: the LoRA path sees the input in the LoRA dtype
        update = torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2))
        return (result + update * self.scaling).to(result.dtype)


def attach_stacked_lora(model: nn.Module, targets: tuple[str, ...], slots: int, rank: int,
                        alpha: float) -> tuple[dict[str, StackedLoraLinear], SlotRouter]:
    """Freeze ``model`` and wrap every ``nn.Linear`` whose leaf name is in ``targets``.

    Returns ``{module path: wrapper}`` in ``named_modules`` order (PEFT's order, which the
    seeded init relies on) and the router the wrappers read their row-to-slot map from.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    router = SlotRouter()
    found = [(name, mod) for name, mod in model.named_modules()
             if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in targets]
    if not found:
        raise ValueError(f"no nn.Linear named {targets} in the model")
    layers: dict[str, StackedLoraLinear] = {}
    for name, mod in found:
        parent_name, _, leaf = name.rpartition(".")
        wrapper = StackedLoraLinear(mod, slots, rank, alpha, router)
        setattr(model.get_submodule(parent_name), leaf, wrapper)
        layers[name] = wrapper
    logger.debug("stacked LoRA on %d layers, %d slots, rank %d", len(layers), slots, rank)
    return layers, router
