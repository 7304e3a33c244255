"""Merge-aware training: a row's update is the exact merge with its partners, plans draw
partners and their QA pairs, and training lowers the loss inside a merge."""

import pytest
import torch
from test_batched_train import ITEMS

from conftest import random_adapter
from prag_vllm.adapters import AdapterStore
from prag_vllm.errors import InputError
from prag_vllm.merge import merge_adapters
from prag_vllm.parameterize import DocumentTrainer, TrainConfig
from prag_vllm.training import BatchConfig, BatchedTrainer
from prag_vllm.training.driver import parameterize_batched
from prag_vllm.training.layer import SlotRouter, StackedLoraLinear
from prag_vllm.training.partners import PartnerBank
from prag_vllm.training.schedule import plan_document
from prag_vllm.workspace import training_key

CFG = TrainConfig(epochs=3, lr=3e-3, precision="float32")
AUGS = {d.id: a for d, a in ITEMS if a is not None}
DOCS = [d for d, _ in ITEMS]


def test_row_with_partners_is_the_exact_merge():
    torch.manual_seed(0)
    router = SlotRouter()
    layer = StackedLoraLinear(torch.nn.Linear(8, 6), slots=2, rank=2, alpha=32.0, router=router)
    for p in (layer.lora_A, layer.lora_B):
        p.data.normal_()
    layer.partner_A, layer.partner_B = torch.randn(3, 2, 8), torch.randn(3, 6, 2)
    x = torch.randn(2, 5, 8)
    router.rows, router.partners = torch.tensor([0, 1]), torch.tensor([[2, 0], [1, 2]])
    y = layer(x)
    for n, (slot, partners) in enumerate([(0, [2, 0]), (1, [1, 2])]):
        a = torch.cat([layer.lora_A.detach()[slot], *[layer.partner_A[p] for p in partners]])
        b = torch.cat([layer.lora_B.detach()[slot], *[layer.partner_B[p] for p in partners]], dim=1)
        assert torch.allclose(y[n], layer.base_layer(x[n]) + 16.0 * x[n] @ a.T @ b.T, atol=1e-4)
    y.sum().backward()  # the partners are frozen; each slot's gradient comes from its own row only
    assert not layer.partner_A.requires_grad and not layer.partner_B.requires_grad
    router.rows, router.partners = torch.tensor([0]), torch.tensor([[2, 0]])
    alone = torch.autograd.grad(layer(x[:1]).sum(), layer.lora_A)[0]
    assert torch.allclose(alone[0], layer.lora_A.grad[0], atol=1e-4) and not alone[1].any()


@pytest.fixture(scope="module")
def partner_store(tiny_model_dir, tmp_path_factory):
    """Every document's adapter trained alone: the partner set."""
    store = AdapterStore(tmp_path_factory.mktemp("partners") / training_key(CFG))
    parameterize_batched(DOCS, AUGS, store, tiny_model_dir, CFG, progress=False)
    return store


def merged_cfg(store, n=2):
    return TrainConfig(**{**CFG.__dict__, "merge_partners": n, "partner_adapters": str(store.root)})


def test_plan_draws_partners_and_their_qa(tiny_model_dir, partner_store):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = merged_cfg(partner_store)
    bank = PartnerBank.load(partner_store.root, DOCS, AUGS, scaling=16.0)
    assert bank.ids == ["d1", "d2", "d5", "d6"]  # the documents with QA pairs
    alone = plan_document(DOCS[0], AUGS["d1"], tok, CFG)
    plan = plan_document(DOCS[0], AUGS["d1"], tok, cfg, bank)
    assert len(plan.partners) == len(plan.steps) == len(alone.steps)
    for step, own, partners in zip(plan.steps, alone.steps, plan.partners):
        assert step[:len(own)] == own and len(step) == len(own) + 2
        assert len(set(partners)) == 2 and bank.ids.index("d1") not in partners
        for i, p in zip(step[len(own):], partners):  # a QA pair of that partner, loss on the answer only
            ex = plan.examples[i]
            answer = tok.decode([t for t, m in zip(ex.input_ids, ex.targets) if m])
            assert answer.startswith(tuple(qa["answer"] for qa in bank.qa[p]))
            assert {r for r, m in zip(ex.roles, ex.targets) if m} <= {"answer", "eot"}
    assert len({tuple(p) for p in plan.partners}) > 1  # drawn afresh per step
    again = plan_document(DOCS[0], AUGS["d1"], tok, cfg, bank)
    assert again.partners == plan.partners and [e.input_ids for e in again.examples] == [
        e.input_ids for e in plan.examples]


def qa_loss_in_merge(model_dir, adapter, partners, qa) -> float:
    """Mean answer loss of ``qa`` with ``adapter`` merged with ``partners`` (PEFT, float32)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prag_vllm.recipes import answer_example

    tok = AutoTokenizer.from_pretrained(model_dir)
    merged = merge_adapters([adapter, *partners])
    path = model_dir.parent / f"merged-{id(adapter)}"
    merged.save(path)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), path)
    losses = []
    for pair in qa:
        ex = answer_example(tok, pair["question"], pair["answer"])
        labels = [t if m else -100 for t, m in zip(ex.input_ids, ex.targets)]
        with torch.no_grad():
            losses.append(model(input_ids=torch.tensor([ex.input_ids]), labels=torch.tensor([labels])).loss.item())
    return sum(losses) / len(losses)


def test_merge_aware_training_lowers_the_loss_inside_a_merge(tiny_model_dir, partner_store, tmp_path):
    cfg = merged_cfg(partner_store)
    assert training_key(cfg) != training_key(CFG) and "-m2-" in training_key(cfg)
    before = {d: partner_store.path(d).joinpath("adapter_model.safetensors").read_bytes() for d in ("d1", "d2")}
    store = AdapterStore(tmp_path / training_key(cfg))
    summary = parameterize_batched(DOCS, AUGS, store, tiny_model_dir, cfg, batch=BatchConfig(slots=3),
                                   progress=False)
    assert summary["trained"] == len(DOCS)
    assert before == {d: partner_store.path(d).joinpath("adapter_model.safetensors").read_bytes() for d in before}
    aware, alone = store.load("d5"), partner_store.load("d5")
    assert aware.meta["train"]["merge_partners"] == 2
    assert aware.meta["train"]["partner_adapters"] == partner_store.root.name
    # inside a merge with two other documents' (alone-trained) adapters, d5 and the partners'
    # own questions: the merge-aware adapter, trained for exactly this, does better
    partners = [partner_store.load("d1"), partner_store.load("d6")]
    qa = list(AUGS["d5"].qa) + list(AUGS["d1"].qa) + list(AUGS["d6"].qa)
    assert qa_loss_in_merge(tiny_model_dir, aware, partners, qa) < qa_loss_in_merge(tiny_model_dir, alone, partners, qa)


def test_merge_partners_errors(tiny_model_dir, tmp_path, partner_store):
    with pytest.raises(InputError, match="non-negative"):
        TrainConfig(merge_partners=-1, partner_adapters="x")
    with pytest.raises(InputError, match="batched trainer only"):
        DocumentTrainer(tiny_model_dir, merged_cfg(partner_store))
    with pytest.raises(InputError, match="PartnerBank"):
        BatchedTrainer(tiny_model_dir, merged_cfg(partner_store))
    with pytest.raises(InputError, match="not found"):
        PartnerBank.load(tmp_path / "nothing", DOCS, AUGS, scaling=16.0)
    with pytest.raises(InputError, match="at least 2"):
        PartnerBank.load(partner_store.root, DOCS[:1], AUGS, scaling=16.0)
    bank = PartnerBank.load(partner_store.root, DOCS, AUGS, scaling=16.0)
    with pytest.raises(InputError, match="merge_partners=4"):
        bank.draw("d1", 4, __import__("random").Random(0))
    assert not any((tmp_path / "nothing").parent.glob("nothing*"))


def test_partners_scaled_to_the_trainer(tiny_model_dir, tmp_path):
    """A partner trained with another alpha still adds its own update."""
    store = AdapterStore(tmp_path / "s")
    for i, d in enumerate(("d1", "d2")):
        store.save(d, random_adapter(tiny_model_dir, seed=i, alpha=64.0 if d == "d1" else 32.0))
    bank = PartnerBank.load(store.root, DOCS, AUGS, scaling=16.0)
    name = next(iter(bank.weights))
    a, b = store.load("d1").weights[name]
    assert torch.allclose(bank.weights[name][1][0], b.float() * 2.0)
    assert torch.equal(bank.weights[name][0][0], a.float())


def test_default_partner_set_is_trained_first_beside(tiny_model_dir, tmp_path):
    """Without ``partner_adapters`` the partners are the set trained alone under the same
    settings, beside the merge-aware one; the driver trains it first."""
    from prag_vllm.workspace import TRAIN_CONFIG_FILE, keyed_store, partner_config, partner_key

    cfg = TrainConfig(**{**CFG.__dict__, "merge_partners": 1})
    assert partner_key(cfg) == training_key(CFG)
    store = keyed_store(tmp_path / "adapters" / training_key(cfg), cfg)
    summary = parameterize_batched(DOCS[:4], AUGS, store, tiny_model_dir, cfg, progress=False)
    assert summary["trained"] == 4
    alone = AdapterStore(tmp_path / "adapters" / training_key(partner_config(cfg)))
    assert (alone.root / TRAIN_CONFIG_FILE).is_file() and all(alone.has(d.id) for d in DOCS[:4])
    assert store.load("d1").meta["train"]["partner_adapters"] == alone.root.name
    assert alone.load("d1").meta["train"].get("merge_partners") is None


def test_settings_record_partners_only_when_set(tmp_path):
    """Runs and adapter sets from before merge-aware training keep their settings and keys."""
    from prag_vllm.evaluation.settings import train_settings
    from prag_vllm.workspace import training_settings

    assert "merge_partners" not in train_settings(CFG) and "merge_partners" not in training_settings(CFG)
    aware = TrainConfig(**{**CFG.__dict__, "merge_partners": 2, "partner_adapters": str(tmp_path / "set-x")})
    assert train_settings(aware)["partner_adapters"] == "set-x" == training_settings(aware)["partners"]
