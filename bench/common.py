"""Shared by the bench scripts: the run metadata every result file carries."""

from __future__ import annotations

import os
import platform
import sys
from datetime import datetime, timezone


def run_metadata() -> dict:
    """Command, UTC date and machine of this run."""
    return {"command": " ".join(sys.argv), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"}


def synthetic_adapter(model_config, base_model: str, generator, r: int, alpha: float, a_std: float, b_std: float,
                      meta: dict | None = None):
    """A random FFN LoRA of rank ``r`` for speed measurements (speed depends on shape, not values)."""
    import torch

    from prag_vllm.adapters import LoraAdapter

    ad = LoraAdapter.zeros(model_config, r=r, base_model=base_model)
    ad.weights = {m: (torch.randn(a.shape, generator=generator) * a_std, torch.randn(b.shape, generator=generator) * b_std)
                  for m, (a, b) in ad.weights.items()}
    ad.alpha, ad.meta = alpha, dict(meta or {})
    return ad
