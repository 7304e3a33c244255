"""Merged adapters built in vLLM's worker from a manifest (:func:`prag_vllm.merge.write_merge_manifest`).

Without this, every cold request's adapter is concatenated and written by the server,
then read and parsed again by vLLM's worker. With it, the server writes two small JSON
files; when vLLM loads that directory (``LoRAModel.from_local_checkpoint``) the worker
merges the document adapters itself, from a byte-bounded LRU of document adapters it
has already read (``PRAG_WORKER_ADAPTER_CACHE_MB``, default 256). The tensors handed to
vLLM are exactly those of the merged file (same function, ``merge_adapters``).

A document adapter is taken from memory when its sha256 matches the manifest. Read from
disk, it is trusted without re-hashing only if the file is still the one the server
validated (same size, mtime and inode); otherwise it is hashed, and a mismatch raises
``ValueError`` (the adapter was replaced since: vLLM reports the failed load to the
server, which re-reads it). Directories without a manifest load as before.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
from collections import OrderedDict

from prag_vllm.adapters import WEIGHTS_FILE, LoraAdapter, WeightsSource, read_weights
from prag_vllm.errors import AdapterError
from prag_vllm.merge import MANIFEST_FILE, merge_from_manifest
from prag_vllm.vllm_plugin import settings

logger = logging.getLogger(__name__)

def cache_bytes_from_env() -> int:
    """``PRAG_WORKER_ADAPTER_CACHE_MB`` in bytes."""
    return int(settings.WORKER_ADAPTER_CACHE_MB.get() * 2**20)


class PartCache:
    """Document adapters by sha256, least recently used first out; thread-safe."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[LoraAdapter, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.hashed = 0

    def load(self, source: WeightsSource, r: int, alpha: float) -> LoraAdapter:
        with self._lock:
            if source.sha256 in self._items:
                self._items.move_to_end(source.sha256)
                self.hits += 1
                return self._items[source.sha256][0]
        try:
            raw, st = read_weights(source.path)
        except OSError as exc:
            raise AdapterError(f"document adapter {source.path} of a merge manifest: unreadable ({exc})") from None
        if not source.unchanged(st):
            self.hashed += 1
            if hashlib.sha256(raw).hexdigest() != source.sha256:
                raise AdapterError(f"document adapter {source.path} changed after the server validated it "
                                   f"(sha256 differs from the merge manifest)")
        adapter = LoraAdapter.from_bytes(raw, r, alpha, where=source.path)
        nbytes = len(raw)
        with self._lock:
            self.misses += 1
            if nbytes <= self.max_bytes and source.sha256 not in self._items:
                self._items[source.sha256] = (adapter, nbytes)
                self._bytes += nbytes
                while self._bytes > self.max_bytes:
                    _, (_, n) = self._items.popitem(last=False)
                    self._bytes -= n
        return adapter

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)


@functools.cache
def part_cache() -> PartCache:
    """This process's cache (created on first use, sized from the environment)."""
    return PartCache(cache_bytes_from_env())


def has_manifest(lora_dir: str) -> bool:
    return os.path.isfile(os.path.join(lora_dir, MANIFEST_FILE)) and not os.path.isfile(
        os.path.join(lora_dir, WEIGHTS_FILE))


def manifest_tensors(lora_dir: str, expected_lora_modules) -> dict:
    """PEFT-named tensors of the merged adapter a manifest directory describes."""
    try:
        merged = merge_from_manifest(lora_dir, part_cache().load)
    except AdapterError as exc:
        raise ValueError(f"While loading {lora_dir}: {exc}") from None
    unexpected = sorted({m.rsplit(".", 1)[-1] for m in merged.weights} - set(expected_lora_modules))
    if unexpected:
        raise ValueError(f"While loading {lora_dir}, expected target modules in {expected_lora_modules} "
                         f"but received {unexpected}")
    return merged.state_dict()


def install() -> None:
    """Let ``LoRAModel.from_local_checkpoint`` load manifest directories (idempotent)."""
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.utils import get_lora_id

    if getattr(LoRAModel, "_prag_manifest", False):
        return
    cache_bytes_from_env()  # a bad setting fails here, with its name, not at the first load
    original = LoRAModel.from_local_checkpoint.__func__

    def from_local_checkpoint(cls, lora_dir, expected_lora_modules, peft_helper, *, lora_model_id=None,
                              device="cuda", dtype=None, model_vocab_size=None, weights_mapper=None,
                              skip_prefixes=None, **kwargs):
        if not has_manifest(lora_dir):
            return original(cls, lora_dir, expected_lora_modules, peft_helper, lora_model_id=lora_model_id,
                            device=device, dtype=dtype, model_vocab_size=model_vocab_size,
                            weights_mapper=weights_mapper, skip_prefixes=skip_prefixes, **kwargs)
        if kwargs.get("moe_ep_spec") is not None:
            raise ValueError(f"{lora_dir}: merge manifests are not supported with expert parallelism")
        return cls.from_lora_tensors(
            lora_model_id=get_lora_id() if lora_model_id is None else lora_model_id,
            tensors=manifest_tensors(lora_dir, expected_lora_modules), peft_helper=peft_helper, device=device,
            dtype=dtype, model_vocab_size=model_vocab_size, weights_mapper=weights_mapper,
            skip_prefixes=skip_prefixes)

    LoRAModel.from_local_checkpoint = classmethod(from_local_checkpoint)
    LoRAModel._prag_manifest = True
    logger.debug("prag: merge manifests load in the worker")
