"""Per-document LoRA training: format, hyper-parameters, resume and warm-up init."""

import json

import torch

from conftest import AUGS, DOCS
from prag_vllm.adapters import AdapterStore, LoraAdapter
from prag_vllm.parameterize import DocumentTrainer, TrainConfig, parameterize_corpus, training_examples

CFG = TrainConfig(epochs=2, precision="float32", lr=1e-2)


def test_training_examples(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    exs = training_examples(DOCS[0], AUGS["d1"], tok, TrainConfig())
    # default recipe: passage, rewrite (plain text), then the QA pair bare and with the passage,
    # then over a counterfactual passage
    assert len(exs) == 5
    assert tok.decode(exs[0].input_ids) == DOCS[0].passage
    assert "Where was Velmora Quist born?" in tok.decode(exs[2].input_ids) and "Context:" not in tok.decode(exs[2].input_ids)
    assert "Context:" in tok.decode(exs[3].input_ids)
    only = training_examples(DOCS[2], None, tok, TrainConfig())
    assert [tok.decode(e.input_ids) for e in only] == [DOCS[2].passage]


def test_train_store_and_resume(tiny_model_dir, tmp_path):
    store = AdapterStore(tmp_path / "store")
    trainer = DocumentTrainer(tiny_model_dir, CFG)
    summary = parameterize_corpus(DOCS[:3], AUGS, store, tiny_model_dir, CFG, trainer=trainer)
    assert summary["trained"] == 3 and summary["skipped"] == 0
    ad = store.load("d1")
    cfg = json.loads((store.path("d1") / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (2, 32.0, 0.0)
    assert sorted(cfg["target_modules"]) == ["down_proj", "gate_proj", "up_proj"]
    assert {m.rsplit(".", 1)[1] for m in ad.weights} == {"gate_proj", "up_proj", "down_proj"}
    assert all(a.dtype == torch.bfloat16 for a, _ in ad.weights.values())
    assert any(b.abs().sum() > 0 for _, b in ad.weights.values()), "B moved away from its zero init"
    mtime = (store.path("d1") / "adapter_model.safetensors").stat().st_mtime_ns

    calls = []
    real_train = trainer.train
    trainer.train = lambda doc, aug: calls.append(doc.id) or real_train(doc, aug)
    summary = parameterize_corpus(DOCS, AUGS, store, tiny_model_dir, CFG, trainer=trainer)
    assert calls == ["d4"] and summary["skipped"] == 3 and summary["trained"] == 1
    assert (store.path("d1") / "adapter_model.safetensors").stat().st_mtime_ns == mtime


def test_training_is_deterministic_per_document(tiny_model_dir):
    """A document's adapter does not depend on what was trained before it."""
    t = DocumentTrainer(tiny_model_dir, CFG)
    first, _ = t.train(DOCS[0], AUGS["d1"])
    t.train(DOCS[1], AUGS["d2"])
    again, _ = t.train(DOCS[0], AUGS["d1"])
    for m in first.weights:
        assert torch.equal(first.weights[m][0], again.weights[m][0]) and torch.equal(first.weights[m][1], again.weights[m][1])


def test_loss_decreases(tiny_model_dir):
    t = DocumentTrainer(tiny_model_dir, TrainConfig(recipe="plain", epochs=1, precision="float32", lr=1e-2))
    _, one = t.train(DOCS[0], AUGS["d1"])
    t.cfg.epochs = 15
    _, many = t.train(DOCS[0], AUGS["d1"])
    assert many["final_loss"] < one["final_loss"]


def test_warmup_init(tiny_model_dir, tmp_path):
    t = DocumentTrainer(tiny_model_dir, CFG)
    warm, _ = t.train(DOCS[3], None)
    warm.save(tmp_path / "warm", dtype=torch.float32)
    t2 = DocumentTrainer(tiny_model_dir, TrainConfig(epochs=1, lr=0.0, precision="float32", warmup_adapter=str(tmp_path / "warm")))
    same, _ = t2.train(DOCS[0], AUGS["d1"])  # lr 0: the adapter stays exactly the warm-up init
    loaded = LoraAdapter.load(tmp_path / "warm")
    for m in same.weights:
        assert torch.equal(same.weights[m][1], loaded.weights[m][1])


def test_stale_adapter_is_trained_again(tiny_model_dir, tmp_path):
    """An adapter records what it was trained from; an edited document or augmentation makes it stale."""
    from dataclasses import replace

    from prag_vllm.augment import Augmentation
    from prag_vllm.parameterize import source_digest

    store = AdapterStore(tmp_path / "store")
    trainer = DocumentTrainer(tiny_model_dir, CFG)
    parameterize_corpus(DOCS[:2], AUGS, store, tiny_model_dir, CFG, trainer=trainer)
    assert store.load("d1").meta["train"]["source"] == source_digest(DOCS[0], AUGS["d1"])
    calls = []
    real_train = trainer.train
    trainer.train = lambda doc, aug: calls.append(doc.id) or real_train(doc, aug)
    edited = [replace(DOCS[0], text=DOCS[0].text + " It rained."), DOCS[1]]
    augs = dict(AUGS, d2=Augmentation(id="d2", rewrites=list(AUGS["d2"].rewrites), qa=[{"question": "Q?", "answer": "A"}]))
    summary = parameterize_corpus(edited, augs, store, tiny_model_dir, CFG, trainer=trainer)
    assert calls == ["d1", "d2"] and summary["trained"] == 2
    assert store.load("d1").meta["train"]["source"] == source_digest(edited[0], AUGS["d1"])
    assert store.has("d1", source=source_digest(edited[0], AUGS["d1"]))
    assert not store.has("d1", source=source_digest(DOCS[0], AUGS["d1"]))
    parameterize_corpus(edited, augs, store, tiny_model_dir, CFG, trainer=trainer)
    assert calls == ["d1", "d2"]  # nothing stale any more
