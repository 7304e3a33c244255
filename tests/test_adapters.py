import json

import pytest
import torch

from conftest import random_adapter
from prag_vllm.adapters import AdapterStore, LoraAdapter, doc_key
from prag_vllm.errors import AdapterError


def test_peft_format_roundtrip_bf16(tiny_model_dir, tmp_path):
    ad = random_adapter(tiny_model_dir, seed=0)
    path = ad.save(tmp_path / "a")
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["lora_alpha"] == 32 and cfg["lora_dropout"] == 0.0
    assert sorted(cfg["target_modules"]) == ["down_proj", "gate_proj", "up_proj"]
    back = LoraAdapter.load(path)
    a, b = back.weights["model.layers.0.mlp.up_proj"]
    assert a.dtype == torch.bfloat16 and a.shape == (2, 64) and b.shape == (128, 2)
    assert torch.equal(a, ad.weights["model.layers.0.mlp.up_proj"][0].to(torch.bfloat16))


def test_peft_can_load_it(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    random_adapter(tiny_model_dir, seed=0).save(tmp_path / "a")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "a")
    assert model.peft_config["default"].r == 2


def test_corrupt_adapter_rejected(tiny_model_dir, tmp_path):
    path = random_adapter(tiny_model_dir, seed=0).save(tmp_path / "a")
    w = path / "adapter_model.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(AdapterError, match="checksum"):
        LoraAdapter.load(path)
    (path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError):
        LoraAdapter.load(path)


def test_store_ids_never_become_paths(tiny_model_dir, tmp_path):
    store = AdapterStore(tmp_path / "store")
    evil = "../../etc/passwd"
    store.save(evil, random_adapter(tiny_model_dir, seed=0))
    assert store.has(evil) and store.path(evil).parent == tmp_path / "store" / "docs"
    assert len(doc_key(evil)) == 32 and "/" not in doc_key(evil)
    assert store.load(evil).meta["doc_id"] == evil


def test_fast_safetensors_writer_matches_the_library(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from prag_vllm.adapters import write_safetensors_fast

    g = torch.Generator().manual_seed(0)
    tensors = {"a.lora_A.weight": torch.randn(2, 7, generator=g).bfloat16(),
               "a.lora_B.weight": torch.randn(5, 2, generator=g),
               "b.lora_A.weight": torch.randn(3, 3, generator=g).half()[:, :2].contiguous()}
    write_safetensors_fast(tensors, tmp_path / "fast.safetensors")
    save_file(tensors, str(tmp_path / "lib.safetensors"))
    fast, lib = load_file(str(tmp_path / "fast.safetensors")), load_file(str(tmp_path / "lib.safetensors"))
    assert fast.keys() == lib.keys() == tensors.keys()
    for k in tensors:
        assert fast[k].dtype == tensors[k].dtype and torch.equal(fast[k], tensors[k])
