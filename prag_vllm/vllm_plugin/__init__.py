"""vLLM plugin (entry point ``vllm.general_plugins``): grouped CPU LoRA ops.

Linear layers go through :mod:`prag_vllm.vllm_plugin.punica` (a per-step plan, a few
matmuls per layer); the remaining op-level entry points through :mod:`.lora_ops`;
:mod:`.compile` keeps torch.compile on; :mod:`.loading` makes ``add_lora`` cheaper;
:mod:`.merged` lets the worker build merged adapters from a manifest; :mod:`.gather` runs
decode steps with many distinct adapters; :mod:`.idle` shortens vLLM's busy-waiting between its processes (CPU only).

vLLM loads general plugins in every process it starts (engine core and workers), so the
patch is in place before any model runs. It only touches the CPU punica wrapper and can
be turned off with ``PRAG_STOCK_LORA_OPS=1`` (for side-by-side benchmarks).
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice", "sgmv_shrink", "sgmv_expand", "sgmv_expand_slice")


def enabled() -> bool:
    return os.environ.get("PRAG_STOCK_LORA_OPS", "0") not in ("1", "true", "yes")


def _on_cpu() -> bool:
    try:
        from vllm.platforms import current_platform

        return current_platform.is_cpu()
    except Exception:  # platform detection failed: leave vLLM's behaviour alone
        return False


def register() -> None:
    """Swap vLLM's per-token CPU LoRA ops for grouped ones (idempotent)."""
    if not enabled():
        logger.info("prag: keeping vLLM's stock CPU LoRA ops (PRAG_STOCK_LORA_OPS=1)")
        return
    try:
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:  # vLLM without the CPU punica wrapper: nothing to patch
        return
    from prag_vllm.vllm_plugin import lora_ops, punica

    for name in _OPS:  # every op the wrapper still calls directly (embeddings, logits)
        setattr(punica_cpu, name, getattr(lora_ops, name))
    punica.install(punica_cpu.PunicaWrapperCPU)
    from prag_vllm.vllm_plugin import compile as lora_compile
    from prag_vllm.vllm_plugin import gather, idle, loading, merged

    loading.install()
    merged.install()
    gather.install()  # after merged (parts): notes every slot write for the gather kernels' mirror
    if _on_cpu():
        idle.install()

    if lora_compile.enabled():
        lora_compile.install()
    logger.debug("prag: grouped CPU LoRA ops installed")
