"""Batched trainer on a real model (SmolLM2-135M): bit-for-bit the PEFT one-document adapters."""

import pytest
import torch

from conftest import AUGS, DOCS
from prag_vllm.parameterize import DocumentTrainer, TrainConfig
from prag_vllm.training import BatchConfig, BatchedTrainer


@pytest.mark.parametrize("precision", ["float32", "bf16-mixed"])
def test_smollm2_bit_exact(test_model_dir, precision):
    items = [(DOCS[0], AUGS["d1"]), (DOCS[3], None)]  # 2 sequences and 1 sequence
    cfg = TrainConfig(epochs=2, precision=precision)
    reference = DocumentTrainer(test_model_dir, cfg)
    ref = {d.id: reference.train(d, a)[0] for d, a in items}
    got = {r.doc.id: r.adapter for r in BatchedTrainer(test_model_dir, cfg, BatchConfig(slots=2)).train(items)}
    for doc_id, adapter in ref.items():
        assert adapter.weights.keys() == got[doc_id].weights.keys()
        for m, (a, b) in adapter.weights.items():
            assert torch.equal(a, got[doc_id].weights[m][0]) and torch.equal(b, got[doc_id].weights[m][1]), m
        assert any(b.abs().max() > 0 for _, b in got[doc_id].weights.values())
