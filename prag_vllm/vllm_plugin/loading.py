"""Cheaper adapter loading in vLLM's worker (``add_lora``), without changing what is loaded.

Every fresh merged adapter goes through ``LoRAModel.from_local_checkpoint``. For a rank-6
FFN adapter of Qwen2.5-0.5B (144 tensors) about two thirds of its time is overhead that
does not depend on the weights (``docs/notes/lora_cpu.md``):

* tensor names are parsed by ``parse_fine_tuned_lora_name`` three times each (about 360
  calls per adapter), yet every adapter of a model has the same names: the result is
  memoized here (a pure function of the name and the content of the model's weights mapper);
* tensors are read one ``get_tensor`` call at a time from a memory map: here a small
  file (``MAX_WHOLE_READ`` bytes or less) is read once and deserialized from memory by
  ``safetensors.torch.load``, about 2x faster; larger files keep vLLM's memory-mapped reads.

Both patches are in place when the plugin is (``PRAG_STOCK_LORA_OPS=1`` leaves vLLM as it
is); the loaded tensors are identical.
"""

from __future__ import annotations

import functools
import logging
import os
from collections import OrderedDict
from pathlib import Path

from prag_vllm.vllm_plugin import patching
from prag_vllm.vllm_plugin.patching import Patcher

logger = logging.getLogger(__name__)

MAX_WHOLE_READ = 64 << 20
"""Adapter files up to this size are read whole (merged document adapters are a few MB)."""


class WholeFileSafeOpen:
    """``safetensors.safe_open`` for one small file: read once, tensors served from memory."""

    def __init__(self, path: str | os.PathLike, framework: str = "pt", device: str = "cpu"):
        from safetensors.torch import load

        self._tensors = load(Path(path).read_bytes())

    def __enter__(self) -> WholeFileSafeOpen:
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def keys(self) -> list[str]:
        return list(self._tensors)

    def get_tensor(self, name: str):
        return self._tensors[name]


class _SafetensorsShim:
    """What ``vllm.lora.lora_model`` sees as ``safetensors``: small files go through
    :class:`WholeFileSafeOpen`, anything else to the real module."""

    def __init__(self, real):
        self._real = real

    def safe_open(self, path, framework="pt", device="cpu"):
        try:
            small = framework == "pt" and str(device) == "cpu" and os.path.getsize(path) <= MAX_WHOLE_READ
        except OSError:
            small = False
        if small:
            return WholeFileSafeOpen(path, framework, device)
        return self._real.safe_open(path, framework=framework, device=device)

    def __getattr__(self, name: str):
        return getattr(self._real, name)


RECENT_MAPPERS = 8
"""Mapper objects remembered by identity (vLLM builds a new, equal one for every adapter)."""


def memoized_name_parser(parse):
    """``parse(name, weights_mapper)`` cached per (name, the mapper's content).

    vLLM hands every ``add_lora`` a new mapper object with the same content
    (``hf_to_vllm_mapper.get_rename_mapper()``), so the cache keys on ``repr(mapper)``,
    computed once per object. Only the last :data:`RECENT_MAPPERS` objects are kept
    (alive, so their ids are not reused while remembered), plus one per distinct content.
    """
    recent: OrderedDict[int, tuple[object, str]] = OrderedDict()
    by_content: dict[str, object] = {}

    @functools.lru_cache(maxsize=1 << 16)
    def cached(name: str, content: str | None):
        return parse(name, None if content is None else by_content[content])

    @functools.wraps(parse)
    def parse_cached(name: str, weights_mapper=None):
        if weights_mapper is None:
            return cached(name, None)
        seen = recent.get(id(weights_mapper))
        if seen is None or seen[0] is not weights_mapper:
            seen = (weights_mapper, repr(weights_mapper))
            recent[id(weights_mapper)] = seen
            by_content.setdefault(seen[1], weights_mapper)
            while len(recent) > RECENT_MAPPERS:
                recent.popitem(last=False)
        return cached(name, seen[1])

    parse_cached.cache_info = cached.cache_info
    parse_cached.recent = recent
    return parse_cached


def install(patcher: Patcher | None = None) -> None:
    """Patch ``vllm.lora.lora_model`` (idempotent)."""
    from vllm.lora import lora_model

    p = patching.default(patcher)
    if getattr(lora_model, "_prag_loading", False):
        return
    p.set(lora_model, "parse_fine_tuned_lora_name", memoized_name_parser(lora_model.parse_fine_tuned_lora_name))
    p.set(lora_model, "safetensors", _SafetensorsShim(lora_model.safetensors))
    p.set(lora_model, "_prag_loading", True)
    logger.debug("prag: faster LoRA adapter loading installed")
