"""LoRA adapters in PEFT format and the per-document adapter store.

An adapter is held as ``{module_path: (A, B)}`` with A of shape ``[r, in]`` and B of
shape ``[out, r]`` (PEFT's layout), so that ``ΔW = (alpha / r) · B @ A``. On disk it is
a PEFT directory (``adapter_config.json`` + ``adapter_model.safetensors``, bf16 by
default) plus ``prag_meta.json`` with the document id, base model and a sha256 of the
tensors file, written atomically. Raw document ids never become paths: a document's
adapter lives under a hash of its id.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from prag_vllm.errors import AdapterError
from prag_vllm.ffn import FFN_TARGETS, ffn_shapes
from prag_vllm.fileio import atomic_directory, atomic_write_json

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
META_FILE = "prag_meta.json"


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_SAFETENSORS_DTYPES = {"torch.bfloat16": "BF16", "torch.float16": "F16", "torch.float32": "F32"}


def write_safetensors_fast(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write ``tensors`` in the safetensors format (8-byte header length, JSON header, raw
    little-endian data), byte-compatible with ``safetensors.torch.save_file`` readers but
    without its per-tensor conversions: half the time for the server's merged adapters."""
    import struct

    import torch

    header, offset = {}, 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[str(t.dtype)], "shape": list(t.shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for t in tensors.values():
            fh.write(t.contiguous().view(-1).view(torch.uint8).numpy().data)


@functools.lru_cache(maxsize=16)
def _identity(files: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for name, _, _ in files:
        h.update(Path(name).name.encode() + b"\x00" + sha256_file(name).encode())
    return h.hexdigest()[:32]


def model_identity(model_dir: str | os.PathLike) -> str | None:
    """The base model's identity: a hash of its ``config.json`` and weight files' contents
    (computed once per process per file state). None if ``model_dir`` is not a local model."""
    model_dir = Path(model_dir)
    files = sorted([model_dir / "config.json", *model_dir.glob("*.safetensors"), *model_dir.glob("*.bin")])
    if not files[0].is_file() or len(files) < 2:
        return None
    return _identity(tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


@dataclass(frozen=True)
class WeightsSource:
    """Which bytes an adapter was read from: the file and its identity when it was read.

    A later reader can trust the same file without re-hashing it while
    :meth:`unchanged` holds (adapters are replaced by renaming a new directory into
    place, which gives the file a new inode)."""

    path: str
    sha256: str
    size: int
    mtime_ns: int
    inode: int

    def unchanged(self, st: os.stat_result) -> bool:
        return (st.st_size, st.st_mtime_ns, st.st_ino) == (self.size, self.mtime_ns, self.inode)


def read_weights(path: str | os.PathLike) -> tuple[bytes, os.stat_result]:
    """The bytes of a tensors file and its ``fstat`` taken on the same open file."""
    with open(path, "rb") as fh:
        return fh.read(), os.fstat(fh.fileno())


@dataclass
class LoraAdapter:
    """A LoRA on a causal LM: per-module factors plus its rank and alpha."""

    r: int
    """Rank of every module's update."""
    alpha: float
    """LoRA alpha; the update is scaled by ``alpha / r``."""
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    """Module path (e.g. ``model.layers.0.mlp.up_proj``) -> (A ``[r, in]``, B ``[out, r]``)."""
    base_model: str = ""
    """Name or path of the base model it was trained on."""
    target_modules: tuple[str, ...] = FFN_TARGETS
    """Leaf module names the adapter touches."""
    meta: dict = field(default_factory=dict)
    """Free-form metadata written to ``prag_meta.json``."""
    source: WeightsSource | None = field(default=None, repr=False, compare=False)
    """The tensors file it was read from (set by :meth:`load`; not written anywhere)."""

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def delta(self, module: str) -> torch.Tensor:
        """ΔW of one module, ``[out, in]``, in float32."""
        a, b = self.weights[module]
        return self.scaling * (b.float() @ a.float())

    # -- PEFT directory I/O -----------------------------------------------------------
    def peft_config(self) -> dict:
        return {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.r, "lora_alpha": self.alpha,
            "lora_dropout": 0.0, "target_modules": sorted(self.target_modules), "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None,
            "init_lora_weights": True, "inference_mode": True, "base_model_name_or_path": self.base_model,
        }

    def state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        out = {}
        for module, (a, b) in self.weights.items():
            a, b = (a, b) if dtype is None else (a.to(dtype), b.to(dtype))
            out[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.contiguous()
            out[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.contiguous()
        return out

    def save(self, directory: str | os.PathLike, dtype: torch.dtype | None = None, *, scratch: bool = False) -> Path:
        """Write a PEFT adapter directory atomically (bf16 unless ``dtype`` says otherwise).

        ``scratch=True`` (the server's private merged adapters): no fsync and no checksum,
        still renamed into place atomically, so vLLM never reads a half-written adapter.
        """
        import torch
        from safetensors.torch import save_file

        dtype = torch.bfloat16 if dtype is None else dtype
        directory = Path(directory)
        with atomic_directory(directory, durable=not scratch) as tmp:
            if scratch:
                write_safetensors_fast(self.state_dict(dtype), tmp / WEIGHTS_FILE)
            else:
                save_file(self.state_dict(dtype), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
            meta = dict(self.meta, base_model=self.base_model, r=self.r, dtype=str(dtype).removeprefix("torch."))
            if "base_model_id" not in meta and self.base_model and not scratch:
                meta["base_model_id"] = model_identity(self.base_model)
            if scratch:
                (tmp / CONFIG_FILE).write_text(json.dumps(self.peft_config()))
                (tmp / META_FILE).write_text(json.dumps(meta))
            else:
                atomic_write_json(tmp / CONFIG_FILE, self.peft_config())
                atomic_write_json(tmp / META_FILE, dict(meta, sha256=sha256_file(tmp / WEIGHTS_FILE)))
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> LoraAdapter:
        """Read and validate a PEFT adapter directory; raise :class:`AdapterError` if it is bad.

        The weights are always hashed: the sha256 is checked against ``prag_meta.json`` when
        that records one, and it is the adapter's identity in merge manifests (:attr:`source`)."""
        directory = Path(directory)
        cfg_path, w_path, meta_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE, directory / META_FILE
        if not cfg_path.is_file() or not w_path.is_file():
            raise AdapterError(f"{directory}: not a PEFT adapter (missing {CONFIG_FILE} or {WEIGHTS_FILE})")
        try:
            cfg = json.loads(cfg_path.read_text())
            r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
        except (ValueError, KeyError, TypeError) as exc:
            raise AdapterError(f"{cfg_path}: unreadable adapter config ({exc})") from None
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        try:  # one read: hashed and deserialized from memory (2x faster than per-tensor reads)
            raw, st = read_weights(w_path)
        except OSError as exc:
            raise AdapterError(f"{w_path}: unreadable ({exc})") from None
        sha = hashlib.sha256(raw).hexdigest()
        if meta.get("sha256") and sha != meta["sha256"]:
            raise AdapterError(f"{w_path}: checksum mismatch (corrupt or modified adapter)")
        adapter = cls.from_bytes(raw, r, alpha, where=str(w_path))
        adapter.base_model = str(meta.get("base_model", cfg.get("base_model_name_or_path") or ""))
        adapter.meta = meta
        adapter.source = WeightsSource(str(w_path.resolve()), sha, st.st_size, st.st_mtime_ns, st.st_ino)
        return adapter

    @classmethod
    def from_bytes(cls, raw: bytes, r: int, alpha: float, *, where: str = "adapter") -> LoraAdapter:
        """An adapter from the bytes of a PEFT ``adapter_model.safetensors`` (rank ``r``)."""
        from safetensors import SafetensorError
        from safetensors.torch import load

        try:
            tensors = load(raw)
        except (SafetensorError, OSError, ValueError) as exc:
            raise AdapterError(f"{where}: unreadable tensors ({exc})") from None
        weights: dict[str, list] = {}
        for key, t in tensors.items():
            if not key.startswith(PEFT_PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
                raise AdapterError(f"{where}: unexpected tensor {key!r}")
            module = key[len(PEFT_PREFIX):].rsplit(".", 2)[0]
            slot = 0 if key.endswith(".lora_A.weight") else 1
            weights.setdefault(module, [None, None])[slot] = t
        for module, (a, b) in weights.items():
            if a is None or b is None or a.shape[0] != r or b.shape[1] != r:
                raise AdapterError(f"{where}: module {module} does not have rank-{r} A and B factors")
        targets = tuple(sorted({m.rsplit(".", 1)[-1] for m in weights}))
        return cls(r=r, alpha=alpha, weights={m: (a, b) for m, (a, b) in weights.items()}, target_modules=targets)

    @classmethod
    def zeros(cls, model_config: object, r: int = 1, base_model: str = "") -> LoraAdapter:
        """An all-zero FFN adapter for ``model_config``: exactly the base model when applied."""
        import torch

        weights = {module: (torch.zeros(r, fan_in), torch.zeros(fan_out, r))
                   for module, (fan_in, fan_out) in ffn_shapes(model_config).items()}
        return cls(r=r, alpha=float(r), weights=weights, base_model=base_model, meta={"kind": "zero"})


def doc_key(doc_id: str) -> str:
    """File-system-safe key of a document id (a hash: ids never become paths)."""
    return hashlib.sha256(doc_id.encode("utf-8")).hexdigest()[:32]


class AdapterStore:
    """Directory of per-document adapters: ``<root>/docs/<hash(id)>/``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, doc_id: str) -> Path:
        return self.root / "docs" / doc_key(doc_id)

    def has(self, doc_id: str, *, source: str | None = None) -> bool:
        """True if a complete adapter for ``doc_id`` is present (atomic writes: complete or absent).

        ``source``: the digest of what the adapter must have been trained from
        (:func:`prag_vllm.parameterize.source_digest`); an adapter that recorded another one is
        stale (its document or augmentation changed) and counts as absent. Adapters written
        before digests were recorded count as present."""
        p = self.path(doc_id)
        if not ((p / META_FILE).is_file() and (p / WEIGHTS_FILE).is_file()):
            return False
        if source is None:
            return True
        try:
            recorded = json.loads((p / META_FILE).read_text()).get("train", {}).get("source")
        except (OSError, ValueError, AttributeError):
            return False
        return recorded in (None, source)

    def save(self, doc_id: str, adapter: LoraAdapter) -> Path:
        adapter.meta = dict(adapter.meta, doc_id=doc_id)
        return adapter.save(self.path(doc_id))

    def load(self, doc_id: str) -> LoraAdapter:
        """Load and validate; a stored adapter must carry its checksum (see :meth:`LoraAdapter.load`)."""
        adapter = LoraAdapter.load(self.path(doc_id))
        if not adapter.meta.get("sha256"):
            raise AdapterError(f"adapter at {self.path(doc_id)} has no checksum in {META_FILE}")
        if adapter.meta.get("doc_id") != doc_id:
            raise AdapterError(f"adapter at {self.path(doc_id)} belongs to {adapter.meta.get('doc_id')!r}, not {doc_id!r}")
        return adapter

    def __contains__(self, doc_id: str) -> bool:
        return self.has(doc_id)
