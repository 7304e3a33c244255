"""Batched trainer: the same adapters as one-document PEFT training, per-slot AdamW, driver, CLI."""

import random
from dataclasses import replace

import pytest
import torch

from conftest import AUGS, DOCS
from prag_vllm.adapters import AdapterStore
from prag_vllm.augment import Augmentation
from prag_vllm.corpus import Document
from prag_vllm.parameterize import DocumentTrainer, TrainConfig, source_digest
from prag_vllm.training import BatchConfig, BatchedTrainer
from prag_vllm.training.driver import dir_bytes, parameterize_batched
from prag_vllm.training.optim import SlotAdamW
from prag_vllm.training.schedule import micro_batches

# documents of different lengths and sample counts: 1, 1, 2, 6 and 9 sequences
EXTRA = [
    Document("d5", "Lake Verrin", "Lake Verrin lies at 812 m. " * 6 + "Its outflow is the river Ombre."),
    Document("d6", "Halvard Some", "Halvard Some wrote the opera The Glass Orchard, first staged in Brevik in 1934."),
]
EXTRA_AUGS = {
    "d5": Augmentation("d5", rewrites=["At 812 m lies Lake Verrin, drained by the Ombre."],
                       qa=[{"question": "How high is Lake Verrin?", "answer": "812 m"},
                           {"question": "What drains Lake Verrin?", "answer": "the river Ombre"},
                           {"question": "What is Lake Verrin?", "answer": "a lake"}]),
    "d6": Augmentation("d6", rewrites=["The Glass Orchard, an opera by Halvard Some, opened in Brevik in 1934.",
                                       "In 1934 Brevik saw the first staging of Halvard Some's The Glass Orchard."],
                       qa=[{"question": "Who wrote The Glass Orchard?", "answer": "Halvard Some"},
                           {"question": "Where was The Glass Orchard first staged?", "answer": "Brevik"},
                           {"question": "When was The Glass Orchard first staged?", "answer": "1934"}]),
}
ITEMS = [(d, AUGS.get(d.id)) for d in DOCS] + [(d, EXTRA_AUGS[d.id]) for d in EXTRA]
CFG = TrainConfig(epochs=3, lr=3e-3, precision="float32")


def max_diff(a, b) -> float:
    return max((a.weights[m][i] - b.weights[m][i]).abs().max().item() for m in a.weights for i in (0, 1))


POLICY_CASES = [("default", "content"), ("default", "full"), ("default", "answer"), ("paper", "full")]


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """One-document-at-a-time PEFT training of every document, per (recipe, policy, train batch size)."""
    cache = {}

    def get(recipe: str, policy: str, bs: int) -> dict:
        if (recipe, policy, bs) not in cache:
            t = DocumentTrainer(tiny_model_dir, TrainConfig(**{**CFG.__dict__, "batch_size": bs, "recipe": recipe,
                                                              "loss_policy": policy}))
            cache[recipe, policy, bs] = {d.id: t.train(d, a) for d, a in ITEMS}
        return cache[recipe, policy, bs]
    return get


@pytest.mark.parametrize("recipe, policy", POLICY_CASES)
@pytest.mark.parametrize("bs, max_padding", [(1, 0.0), (1, 0.5), (2, 0.0), (2, 0.5)])
def test_equivalent_to_per_document_training(tiny_model_dir, reference, bs, max_padding, recipe, policy):
    """Every A and B within 1e-5 of PEFT's one-document training: same init, data order, steps,
    loss targets -- for every loss policy and the paper recipe (shared init, no shuffle)."""
    cfg = TrainConfig(**{**CFG.__dict__, "batch_size": bs, "recipe": recipe, "loss_policy": policy})
    trainer = BatchedTrainer(tiny_model_dir, cfg, BatchConfig(slots=3, max_batch_tokens=512, max_padding=max_padding))
    done = {r.doc.id: r for r in trainer.train(ITEMS)}  # 6 documents through 3 slots: slots are refilled
    assert set(done) == {d.id for d, _ in ITEMS}
    if max_padding:
        assert trainer.counters["padded_tokens"] > trainer.counters["tokens"], "mixed-length micro-batches ran"
    else:
        assert trainer.counters["padded_tokens"] == trainer.counters["tokens"], "no padding at all"
    for doc_id, (ref_adapter, ref_stats) in reference(recipe, policy, bs).items():
        got = done[doc_id]
        for key in ("sequences", "steps", "tokens"):
            assert got.stats[key] == ref_stats[key], (doc_id, key)
        assert got.stats["final_loss"] == pytest.approx(ref_stats["final_loss"], abs=1e-5, nan_ok=True)
        assert max_diff(got.adapter, ref_adapter) <= 1e-5, doc_id
        if not max_padding and bs == 1:  # unpadded, one sequence per step: bit for bit (measured), every policy
            assert max_diff(got.adapter, ref_adapter) == 0.0, doc_id
        assert got.adapter.meta["train"]["recipe"] == recipe and got.adapter.meta["train"]["loss_policy"] == policy
    assert any(r.adapter.weights[m][1].abs().max() > 0 for r in done.values() for m in r.adapter.weights)


def test_policies_train_different_adapters(reference):
    a, b, c = (reference("default", p, 1)["d5"][0] for p in ("content", "full", "answer"))
    assert max_diff(a, b) > 0 and max_diff(a, c) > 0 and max_diff(b, c) > 0


def test_warmup_init_equivalent(tiny_model_dir, tmp_path, reference):
    reference("default", "content", 1)["d4"][0].save(tmp_path / "warm", dtype=torch.float32)
    cfg = TrainConfig(**{**CFG.__dict__, "warmup_adapter": str(tmp_path / "warm")})
    ref = {d.id: DocumentTrainer(tiny_model_dir, cfg).train(d, a)[0] for d, a in ITEMS[:3]}
    got = {r.doc.id: r.adapter for r in BatchedTrainer(tiny_model_dir, cfg, BatchConfig(slots=2)).train(ITEMS[:3])}
    for doc_id, adapter in ref.items():
        assert max_diff(got[doc_id], adapter) <= 1e-5
        assert got[doc_id].meta["train"]["init"] == "warmup"


def test_bf16_mixed_exact_unpadded_close_padded(tiny_model_dir):
    """bf16-mixed: the same bf16 matmuls as PEFT under autocast (weights pre-cast once)."""
    cfg = TrainConfig(**{**CFG.__dict__, "precision": "bf16-mixed"})
    ref = {d.id: DocumentTrainer(tiny_model_dir, cfg).train(d, a)[0] for d, a in ITEMS[2:]}
    for max_padding in (0.0, 0.5):
        trainer = BatchedTrainer(tiny_model_dir, cfg, BatchConfig(slots=2, max_padding=max_padding))
        got = {r.doc.id: r.adapter for r in trainer.train(ITEMS[2:])}
        for doc_id, adapter in ref.items():
            if max_padding == 0:
                assert max_diff(got[doc_id], adapter) == 0.0, doc_id
            for m in adapter.weights:  # padded rows: bf16 rounding differs, the update stays close
                rel = (got[doc_id].delta(m) - adapter.delta(m)).norm() / adapter.delta(m).norm()
                assert rel < 0.1, (doc_id, m, float(rel))  # measured up to 0.063 (default recipe, 2026-12-06)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_slot_adamw_matches_torch_and_leaves_idle_slots_alone(weight_decay):
    rng = random.Random(0)
    torch.manual_seed(0)
    slots = 5
    stack = [torch.nn.Parameter(torch.randn(slots, 2, 7)), torch.nn.Parameter(torch.randn(slots, 9, 2))]
    ref = [[torch.nn.Parameter(p.data[s].clone()) for p in stack] for s in range(slots)]
    opts = [torch.optim.AdamW(ref[s], lr=3e-2, weight_decay=weight_decay) for s in range(slots)]
    mine = SlotAdamW(stack, slots, lr=3e-2, weight_decay=weight_decay)
    for it in range(25):
        if it == 10:  # a new document enters slot 1: fresh state, as a fresh optimizer
            mine.reset([1])
            opts[1] = torch.optim.AdamW(ref[1], lr=3e-2, weight_decay=weight_decay)
        active = [s for s in range(slots) if rng.random() < 0.6]
        before = [p.data.clone() for p in stack]
        grads = [torch.randn_like(p) * 10 ** rng.uniform(-6, 1) for p in stack]
        for p, g in zip(stack, grads):
            p.grad = g.clone()  # idle slots get gradients too: they must still not move
        mine.step(active)
        mine.zero_grad()
        for s in active:
            for q, g in zip(ref[s], grads):
                q.grad = g[s].clone()
            opts[s].step()
        for s in set(range(slots)) - set(active):
            assert all(torch.equal(p.data[s], b[s]) for p, b in zip(stack, before)), "idle slot moved"
    for s in range(slots):
        for p, q in zip(stack, ref[s]):
            assert torch.equal(p.data[s], q.data), "per-slot AdamW differs from torch.optim.AdamW"


def test_micro_batches_by_length():
    rows = [(0, [1] * 10), (1, [1] * 7), (2, [1] * 10), (3, [1] * 9), (4, [1] * 30)]
    exact = micro_batches(rows, max_tokens=100)
    assert sorted(len(r[1]) for b in exact for r in b) == [7, 9, 10, 10, 30]
    assert all(len({len(r[1]) for r in b}) == 1 for b in exact)  # equal lengths only: no padding
    assert [len(b) for b in exact] == [1, 2, 1, 1]
    loose = micro_batches(rows, max_tokens=40, max_padding=0.2)
    for b in loose:
        width = len(b[0][1])
        assert len(b) * width <= 40 or len(b) == 1
        assert sum(len(r[1]) for r in b) >= 0.8 * len(b) * width
    assert [len(b) for b in loose] == [1, 4]
    assert [len(b) for b in micro_batches(rows, max_tokens=5)] == [1, 1, 1, 1, 1]  # too long: alone


def test_driver_stores_resumes_and_summarizes(tiny_model_dir, tmp_path):
    store = AdapterStore(tmp_path / "store")
    trainer = BatchedTrainer(tiny_model_dir, CFG, BatchConfig(slots=2))
    items = dict((d.id, a) for d, a in ITEMS if a is not None)
    docs = [d for d, _ in ITEMS]
    first = parameterize_batched(docs[:3], items, store, tiny_model_dir, CFG, trainer=trainer)
    assert (first["trained"], first["skipped"]) == (3, 0)
    assert first["tokens"] > 0 and first["documents_per_hour"] > 0 and first["padding_fraction"] == 0
    assert first["bytes_written"] == sum(dir_bytes(store.path(d.id)) for d in docs[:3])
    assert abs(first["bytes_per_document"] - first["bytes_written"] / 3) <= 1
    ad = store.load("d1")
    assert all(a.dtype == torch.bfloat16 and b.dtype == torch.bfloat16 for a, b in ad.weights.values())
    # storage: bf16 tensors only, 3 * layers * r * (hidden + intermediate) * 2 bytes, plus small files
    payload = sum((a.numel() + b.numel()) * a.element_size() for a, b in ad.weights.values())
    assert payload == 3 * 2 * CFG.rank * (64 + 128) * 2
    assert dir_bytes(store.path("d1")) < payload + 16_000
    assert ad.meta["train"]["trainer"] == "batched"
    again = parameterize_batched(docs, items, store, tiny_model_dir, CFG, trainer=trainer)
    assert (again["trained"], again["skipped"]) == (3, 3)
    assert all(store.has(d.id) for d in docs)
    edited = [replace(docs[0], text=docs[0].text + " It rained."), *docs[1:]]  # its adapter is stale now
    third = parameterize_batched(edited, items, store, tiny_model_dir, CFG, trainer=trainer)
    assert (third["trained"], third["skipped"]) == (1, len(docs) - 1)
    assert store.load(docs[0].id).meta["train"]["source"] == source_digest(edited[0], items.get(docs[0].id))


def test_cli_parameterize_batched_sharded(tiny_model_dir, tmp_path, capsys):
    import json

    from prag_vllm.cli import main
    from prag_vllm.corpus import save_corpus_jsonl

    corpus = tmp_path / "corpus.jsonl"
    save_corpus_jsonl(DOCS + EXTRA, corpus)
    common = ["parameterize", "--work-dir", str(tmp_path / "w"), "--corpus", str(corpus), "--model",
              str(tiny_model_dir), "--no-augmentation", "--epochs", "1", "--slots", "2"]
    counts = []
    for i in range(2):
        assert main([*common, "--shard", f"{i}/2"]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert summary["trainer"] == "batched" and summary["shard"] == f"{i}/2"
        counts.append(summary["trained"])
    assert sum(counts) == 6 and min(counts) > 0
    store = AdapterStore(summary["store"])
    assert all(store.has(d.id) for d in DOCS + EXTRA)
    with pytest.raises(SystemExit) as exc:
        main([*common, "--shard", "2/2"])
    assert exc.value.code == 2 and "bad shard 2/2" in capsys.readouterr().err
