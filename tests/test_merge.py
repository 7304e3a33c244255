"""Exact merge: ΔW of the merged rank-2k adapter equals the sum of the k per-document ΔW."""

import hashlib

import pytest
import torch

from conftest import random_adapter
from prag_vllm.adapters import LoraAdapter
from prag_vllm.errors import AdapterError
from prag_vllm.merge import MergedAdapterCache, merge_adapters, merged_key


def test_merged_delta_equals_sum(tiny_model_dir):
    ads = [random_adapter(tiny_model_dir, seed=s) for s in range(3)]
    merged = merge_adapters(ads)
    assert merged.r == 6 and merged.scaling == pytest.approx(ads[0].scaling)
    for module in ads[0].weights:
        expected = sum(a.delta(module) for a in ads)
        assert torch.allclose(merged.delta(module), expected, atol=1e-5, rtol=0)
        assert merged.weights[module][0].shape == (6, ads[0].weights[module][0].shape[1])


def test_merge_folds_different_scalings(tiny_model_dir):
    a = random_adapter(tiny_model_dir, seed=1, alpha=32.0)
    b = random_adapter(tiny_model_dir, seed=2, alpha=8.0, rank=1)
    merged = merge_adapters([a, b])
    assert merged.r == 3
    for module in a.weights:
        assert torch.allclose(merged.delta(module), a.delta(module) + b.delta(module), atol=1e-5, rtol=0)


def test_folded_scaling_same_delta_and_bit_exact_in_bf16(tiny_model_dir):
    ads = [random_adapter(tiny_model_dir, seed=s) for s in range(3)]
    for ad in ads:
        ad.weights = {m: (a.bfloat16(), b.bfloat16()) for m, (a, b) in ad.weights.items()}
    folded = merge_adapters(ads, fold_scaling=True)
    assert folded.r == 6 and folded.scaling == 1.0
    for module in ads[0].weights:
        expected = sum(a.delta(module).float() for a in ads)
        assert torch.allclose(folded.delta(module).float(), expected, atol=1e-3, rtol=1e-2)
        b = folded.weights[module][1]
        assert b.dtype == torch.bfloat16
        assert torch.equal(b[:, :2], ads[0].weights[module][1] * 16)  # s_j = 32 / 2 = 16: exact


def test_merge_rejects_mismatch(tiny_model_dir):
    a = random_adapter(tiny_model_dir, seed=1)
    b = random_adapter(tiny_model_dir, seed=2)
    b.weights.pop(next(iter(b.weights)))
    with pytest.raises(AdapterError):
        merge_adapters([a, b])
    with pytest.raises(AdapterError):
        merge_adapters([])


def test_merged_logits_equal_base_with_deltas_added(tiny_model_dir, tmp_path):
    """PEFT model with the merged adapter == base model whose weights have every ΔW_j added."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ads = [random_adapter(tiny_model_dir, seed=s, std=0.1) for s in range(3)]
    merge_adapters(ads).save(tmp_path / "merged", dtype=torch.float32)
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(ids).logits
        for module in ads[0].weights:
            base.get_submodule(module).weight += sum(a.delta(module) for a in ads)
        edited = base(ids).logits

    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(fresh, tmp_path / "merged").eval()
    with torch.no_grad():
        merged_logits = peft_model(ids).logits
    assert (edited - base_logits).abs().max() > 1e-2, "the deltas must change the logits"
    assert torch.allclose(merged_logits, edited, atol=1e-4, rtol=1e-4)


def test_cache_key_and_reuse(tiny_model_dir, tmp_path):
    from prag_vllm.adapters import AdapterStore

    store = AdapterStore(tmp_path / "store")
    for i, doc in enumerate(["a", "b"]):
        store.save(doc, random_adapter(tiny_model_dir, seed=i))
    assert merged_key(["a", "b"]) == merged_key(["b", "a", "a"]) != merged_key(["a"])
    cache = MergedAdapterCache(store)
    p1 = cache.get(["b", "a"])
    mtime = (p1 / "adapter_model.safetensors").stat().st_mtime_ns
    assert cache.get(["a", "b"]) == p1 and (p1 / "adapter_model.safetensors").stat().st_mtime_ns == mtime
    merged = LoraAdapter.load(p1)
    assert merged.r == 4 and merged.meta["doc_ids"] == ["a", "b"]


def test_mean_policy_is_the_mean_update_with_factors_untouched(tiny_model_dir, tmp_path):
    from prag_vllm.errors import InputError

    ads = [random_adapter(tiny_model_dir, seed=s) for s in range(3)]
    for ad in ads:
        ad.weights = {m: (a.bfloat16(), b.bfloat16()) for m, (a, b) in ad.weights.items()}
    mean, total = merge_adapters(ads, policy="mean"), merge_adapters(ads)
    assert mean.r == total.r == 6 and mean.scaling == pytest.approx(total.scaling / 3)
    for module in ads[0].weights:
        assert all(torch.equal(x, y) for x, y in zip(mean.weights[module], total.weights[module]))  # exact in bf16
        expected = sum(a.delta(module).float() for a in ads) / 3
        assert torch.allclose(mean.delta(module).float(), expected, atol=1e-4, rtol=1e-2)
    one = merge_adapters(ads[:1], policy="mean")  # k = 1: the adapter itself
    assert one.scaling == ads[0].scaling
    # cache: the sum key is the one of before (existing caches stay valid), mean has its own
    assert merged_key(["b", "a"]) == merged_key(["a", "b"], "sum") == hashlib.sha256(b"a\x00b\x00").hexdigest()[:32]
    assert merged_key(["a", "b"], "mean") != merged_key(["a", "b"])
    with pytest.raises(InputError, match="unknown merge policy"):
        merged_key(["a"], "median")
    with pytest.raises(InputError, match="unknown merge policy"):
        MergedAdapterCache(None, root=tmp_path, policy="max")
