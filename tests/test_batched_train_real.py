"""Batched trainer on a real model (SmolLM2-135M): bit-for-bit the PEFT one-document adapters,
with every token a target and under the default recipe's masked loss."""

import pytest
import torch

from conftest import AUGS, DOCS
from prag_vllm.parameterize import DocumentTrainer, TrainConfig
from prag_vllm.training import BatchConfig, BatchedTrainer

ITEMS = [(DOCS[0], AUGS["d1"]), (DOCS[3], None)]


def _train_both(test_model_dir, cfg):
    reference = DocumentTrainer(test_model_dir, cfg)
    ref = {d.id: reference.train(d, a)[0] for d, a in ITEMS}
    got = {r.doc.id: r.adapter for r in BatchedTrainer(test_model_dir, cfg, BatchConfig(slots=2)).train(ITEMS)}
    return ref, got


@pytest.mark.parametrize("precision, policy", [("float32", "full"), ("bf16-mixed", "full"), ("float32", "content"),
                                               ("bf16-mixed", "content")])
def test_smollm2_bit_exact(test_model_dir, precision, policy):
    """Adam turns rounding-level gradient differences into visible ones (a zero-init B leaves A's
    first gradients at rounding noise), so only bit-equality says the trainers compute the same."""
    ref, got = _train_both(test_model_dir, TrainConfig(epochs=2, precision=precision, loss_policy=policy))
    for doc_id, adapter in ref.items():
        assert adapter.weights.keys() == got[doc_id].weights.keys()
        for m, (a, b) in adapter.weights.items():
            assert torch.equal(a, got[doc_id].weights[m][0]) and torch.equal(b, got[doc_id].weights[m][1]), m
        assert any(b.abs().max() > 0 for _, b in got[doc_id].weights.values())
