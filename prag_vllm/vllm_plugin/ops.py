"""The plugin's custom ops, ``torch.ops.prag.*``: opaque calls that torch.compile leaves alone.

Both ops (``lora_linear`` in :mod:`~prag_vllm.vllm_plugin.compile`, ``one_row_linear`` in
:mod:`~prag_vllm.vllm_plugin.one_row`) take a layer's name, because a compiled graph can
only pass strings, and look the layer up in their module's registry at run time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_LIBS: dict[str, torch.library.Library] = {}
"""Op name -> the library fragment that holds it. torch cannot unregister an op: after a
rollback it stays registered but unreachable (only the patched names call it)."""


def register(name: str, impl: Callable, fake: Callable, mutates_args: list[str]) -> None:
    """Register ``torch.ops.prag.<name>`` for CPU, once per process. A failed registration
    leaves nothing recorded, so the next install tries again."""
    if name in _LIBS:
        return
    from vllm.utils.torch_utils import direct_register_custom_op

    lib = torch.library.Library("prag", "FRAGMENT")
    direct_register_custom_op(name, impl, mutates_args=mutates_args, fake_impl=fake, target_lib=lib,
                              dispatch_key="CPU")
    _LIBS[name] = lib


def registered(name: str) -> bool:
    """Whether this process registered ``torch.ops.prag.<name>``."""
    return name in _LIBS
