"""Shared by the bench scripts: the run metadata every result file carries."""

from __future__ import annotations

import os
import platform
import sys
from datetime import datetime, timezone


def cpu_description() -> str:
    """CPU model and the instruction sets CPU inference speed hinges on (bf16 matmuls are
    native only with AVX512-BF16 or AMX): results from different CPUs are not comparable."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    isa = ""
    try:
        import torch

        from prag_vllm.vllm_plugin.punica import native_bf16_features

        extras = native_bf16_features()
        isa = torch.backends.cpu.get_cpu_capability()
        isa += "".join(f"+{e}" for e in extras) if extras else " (no native bf16)"
    except Exception:  # torch missing or too old: the model name alone
        pass
    return ", ".join(x for x in (model or platform.processor() or platform.machine(), isa) if x)


def run_metadata() -> dict:
    """Command, UTC date and machine of this run."""
    return {"command": " ".join(sys.argv), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{cpu_description()}, {os.cpu_count()} cores"}


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
