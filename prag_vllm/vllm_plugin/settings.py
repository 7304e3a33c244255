"""The plugin's environment settings, read in vLLM's processes and checked up front.

vLLM loads the plugin in its engine-core and worker processes, where a bad value would
fail with a traceback after the engine had started. :func:`check` reads every setting in
the process that starts the engine (``EngineConfig.apply_env``), so a bad value is one
clear error before vLLM starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Setting:
    """One numeric environment variable."""

    name: str
    default: float
    unit: str
    """What the number counts (for the error message)."""

    def get(self) -> float:
        raw = os.environ.get(self.name)
        if raw is None or raw.strip() == "":
            return self.default
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        if not value >= 0:  # also NaN
            raise ValueError(f"{self.name} must be a number of {self.unit} >= 0, got {raw!r}")
        return value


F32_CACHE_MB = Setting("PRAG_F32_CACHE_MB", 256, "MiB")
"""Bound of the float32 copies of slot weights kept for decode runs (``punica``)."""
WORKER_ADAPTER_CACHE_MB = Setting("PRAG_WORKER_ADAPTER_CACHE_MB", 1024, "MiB")
"""Bound of the document adapters vLLM's worker keeps for merge manifests (``merged``):
about 600 rank-2 FFN adapters of Qwen2.5-0.5B (1.7 MB each in bf16)."""
BUSY_LOOP_S = Setting("PRAG_VLLM_BUSY_LOOP_S", 0.002, "seconds")
"""How long vLLM's shared-memory readers spin before they sleep (``idle``; vLLM's own: 1)."""

ALL = (F32_CACHE_MB, WORKER_ADAPTER_CACHE_MB, BUSY_LOOP_S)


def check() -> None:
    """Raise :class:`prag_vllm.errors.InputError` naming the first bad setting."""
    from prag_vllm.errors import InputError

    for setting in ALL:
        try:
            setting.get()
        except ValueError as exc:
            raise InputError(str(exc)) from None
