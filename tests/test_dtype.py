"""Engine dtype ``auto``: bf16 only where the machine multiplies it natively."""

import pytest

from prag_vllm import generate
from prag_vllm.errors import InputError
from prag_vllm.vllm_plugin import punica


@pytest.mark.parametrize("native,want", [(True, "bfloat16"), (False, "float32")])
def test_auto_dtype_follows_native_bf16(monkeypatch, native, want):
    monkeypatch.setattr(punica, "native_bf16_cpu", lambda: native)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert generate.resolve_dtype("auto") == want
    assert generate.EngineConfig(model="m").vllm_kwargs()["dtype"] == want  # the default is auto
    for explicit in ("bfloat16", "float32"):
        assert generate.resolve_dtype(explicit) == explicit
        assert generate.EngineConfig(model="m", dtype=explicit).vllm_kwargs()["dtype"] == explicit


def test_bad_dtype_is_a_clear_error():
    with pytest.raises(InputError, match="dtype must be one of auto, bfloat16, float32, got 'fp8'"):
        generate.resolve_dtype("fp8")


def test_server_config_checks_dtype():
    from serving.config import ServerConfig

    assert ServerConfig().dtype == "auto"
    with pytest.raises(InputError, match="dtype must be one of"):
        ServerConfig(dtype="half").validate()
