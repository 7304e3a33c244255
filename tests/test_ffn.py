"""FFN module paths and shapes come from the model (:mod:`prag_vllm.ffn`), for every supported architecture."""

from __future__ import annotations

import pytest

from prag_vllm.errors import InputError
from prag_vllm.ffn import FFN_PATHS, FFN_TARGETS, ffn_shapes


def _config(model_type: str):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, vocab_size=32, hidden_size=16, intermediate_size=40, num_hidden_layers=3,
                                num_attention_heads=2, num_key_value_heads=1)


@pytest.mark.parametrize("model_type", sorted(FFN_PATHS))
def test_paths_and_shapes_are_the_models_own(model_type):
    """What :func:`ffn_shapes` names is what the Hugging Face model (so PEFT, the trainer and
    vLLM) calls its FFN projections, with their (in, out) features."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = _config(model_type)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    want = {name: (m.in_features, m.out_features) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in FFN_TARGETS}
    got = ffn_shapes(cfg)
    assert got == want and len(got) == 3 * 3
    assert got["model.layers.2.mlp.down_proj"] == (40, 16)


def test_a_zero_adapter_has_the_same_modules():
    from prag_vllm.adapters import LoraAdapter

    cfg = _config("qwen2")
    ad = LoraAdapter.zeros(cfg, r=2)
    assert {m: (a.shape[1], b.shape[0]) for m, (a, b) in ad.weights.items()} == ffn_shapes(cfg)


def test_an_unknown_architecture_is_one_clear_error():
    with pytest.raises(InputError, match=r"unsupported model architecture 'gpt2' \(GPT2LMHeadModel\).*llama, qwen2"):
        ffn_shapes(_gpt2())


def _gpt2():
    from transformers import GPT2Config

    return GPT2Config(n_layer=1, architectures=["GPT2LMHeadModel"])
