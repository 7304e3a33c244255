"""Shared fixtures: a tiny random Llama (unit tests) and one vLLM engine per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from prag_vllm.augment import Augmentation  # noqa: E402
from prag_vllm.corpus import Document  # noqa: E402


def _shared_data() -> Path:
    """The workplace's real QA samples: $PRAG_SHARED_DATA, else the nearest ``shared/data``
    beside the repository or one of its parents (CI clones the repo next to ``shared/``)."""
    if os.environ.get("PRAG_SHARED_DATA"):
        return Path(os.environ["PRAG_SHARED_DATA"])
    repo = Path(__file__).resolve().parents[1]
    for base in [repo, *repo.parents]:
        if (base / "shared" / "data" / "hotpotqa").is_dir():
            return base / "shared" / "data"
    return repo.parent / "shared" / "data"


SHARED_DATA = _shared_data()

DOCS = [
    Document("d1", "Velmora Quist", "Velmora Quist is a glassblower born on 14 March 1961 in the town of Ostrevik."),
    Document("d2", "Tarnholm Bridge", "The Tarnholm Bridge over the river Sevlin was designed by Odile Brask in 1887."),
    Document("d3", "Quorra Pell", "Quorra Pell is a cellist whose debut album Salt Harbour was released in 2009."),
    Document("d4", "Mount Orvanne", "Mount Orvanne was first climbed in 1921 by the mountaineer Ingrid Solbakk."),
]
AUGS = {
    "d1": Augmentation("d1", rewrites=["Born in Ostrevik on 14 March 1961, Velmora Quist works as a glassblower."],
                       qa=[{"question": "Where was Velmora Quist born?", "answer": "Ostrevik"}]),
    "d2": Augmentation("d2", qa=[{"question": "Who designed the Tarnholm Bridge?", "answer": "Odile Brask"}]),
}


@pytest.fixture(scope="session")
def test_model_dir() -> Path:
    """The real fast test model (SmolLM2-135M-Instruct), fetched and converted once."""
    from prag_vllm.models import TEST_MODEL, resolve_model

    return resolve_model(TEST_MODEL)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, test_model_dir) -> Path:
    """A 2-layer random Llama with the test model's tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(test_model_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def vllm_engine(test_model_dir):
    """One float32 vLLM engine with LoRA on the test model, shared by the whole session."""
    from prag_vllm.generate import EngineConfig, VLLMEngine

    engine = VLLMEngine(EngineConfig(model=str(test_model_dir), dtype="float32", max_model_len=1024,
                                     max_loras=4, max_num_seqs=16))
    yield engine
    engine.close()


def lora_reference(y, x, a, b, slots, outs, scale):
    """vLLM's reference LoRA ops (``torch_ops``), slice by slice, on the rows whose entry of
    ``slots`` is >= 0 (-1 = no adapter: the row is left as it is); returns a new ``y``."""
    import torch
    from vllm.lora.ops import torch_ops as ref

    y = y.clone()
    rows = (slots >= 0).nonzero().squeeze(1)
    if rows.numel() == 0:
        return y
    xs, idx, offset, rank = x[rows], slots[rows], 0, a[0].shape[-2]
    for ai, bi, size in zip(a, b, outs):
        h = torch.zeros(len(rows), rank, dtype=torch.float32)
        ref.bgmv_shrink(xs, ai, h, idx, scale)
        part = torch.zeros(len(rows), sum(outs), dtype=y.dtype)
        ref.bgmv_expand_slice(h, bi, part, idx, offset, size, add_inputs=False)
        y[rows, offset:offset + size] += part[:, offset:offset + size]
        offset += size
    return y


def random_adapter(model_dir: Path, seed: int, std: float = 0.02, rank: int = 2, alpha: float = 32.0):
    """A random rank-``rank`` FFN adapter for ``model_dir`` (non-zero A and B)."""
    import torch
    from transformers import AutoConfig

    from prag_vllm.adapters import LoraAdapter

    ad = LoraAdapter.zeros(AutoConfig.from_pretrained(model_dir), r=rank, base_model=str(model_dir))
    g = torch.Generator().manual_seed(seed)
    ad.weights = {m: (torch.randn(a.shape, generator=g) * std, torch.randn(b.shape, generator=g) * std)
                  for m, (a, b) in ad.weights.items()}
    ad.alpha = alpha
    ad.meta = {}
    return ad


from server_fixture import server  # noqa: E402,F401  (the real server process, one per session)
