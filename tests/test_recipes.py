"""Training recipes and loss policies: which sequences a document trains on, which tokens carry loss."""

import pytest
import torch

from conftest import AUGS, DOCS
from prag_vllm.augment import Augmentation
from prag_vllm.corpus import Document
from prag_vllm.errors import InputError
from prag_vllm.parameterize import TrainConfig, labels_for, training_examples
from prag_vllm.recipes import RECIPES, get_recipe
from prag_vllm.sequences import LOSS_POLICIES, check_loss_policy

DOC = Document("v", "Velmora Quist", "Velmora Quist was born in Ostrevik in 1961.")
AUG = Augmentation("v", rewrites=["Born in 1961, Velmora Quist comes from Ostrevik."],
                   qa=[{"question": "Where was Velmora Quist born?", "answer": "Ostrevik"},
                       {"question": "When was Velmora Quist born", "answer": "1961"},
                       {"question": "What is Velmora Quist?", "answer": "a person."}])
SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture(scope="module")
def tok(test_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(test_model_dir)


def _targets_text(tok, ex) -> str:
    return tok.decode([t for t, m in zip(ex.input_ids, ex.targets) if m])


def test_paper_recipe_sequences_as_prag_writes_them(tok):
    """PRAG's encode.py: QA 1 and 2 with the passage and with the rewrite, QA 3 alone; the generation
    prompt, then 'The answer is X.' with no end of turn; loss on every token."""
    head = ("You should answer the question by referring to the knowledge provided below and integrating "
            "your own knowledge.\n")
    def seq(passage, question, answer):
        ctx = f"Passage 1: {passage}\n" if passage else ""
        return (f"{SYSTEM}<|im_start|>user\n{head}{ctx}\n\nQuestion: {question}<|im_end|>\n"
                f"<|im_start|>assistant\nThe answer is {answer}")
    p, r = DOC.passage, AUG.rewrites[0]
    expected = [seq(p, "Where was Velmora Quist born?", "Ostrevik."), seq(r, "Where was Velmora Quist born?", "Ostrevik."),
                seq(p, "When was Velmora Quist born?", "1961."), seq(r, "When was Velmora Quist born?", "1961."),
                seq(None, "What is Velmora Quist?", "a person.")]
    exs = training_examples(DOC, AUG, tok, TrainConfig(recipe="paper"))
    assert [tok.decode(e.input_ids) for e in exs] == expected
    more = Augmentation("v", rewrites=AUG.rewrites, qa=AUG.qa + [{"question": "Who is Velmora Quist?", "answer": "Q"}])
    assert [tok.decode(e.input_ids) for e in training_examples(DOC, more, tok, TrainConfig(recipe="paper"))] == expected, \
        "PRAG trains on three QA pairs, however many augmentation wrote"
    assert all(all(e.targets[1:]) and not e.targets[0] for e in exs), "full loss: every token but the first"
    assert all(e.input_ids[-1] != tok.eos_token_id for e in exs), "no end of turn after the answer"
    cfg = TrainConfig(recipe="paper")
    assert (cfg.epochs, cfg.lr, cfg.loss_policy, cfg.spec.shuffle, cfg.spec.shared_init) == (1, 3e-4, "full", False, True)


def test_plain_recipe_masks_the_template_and_trains_the_end_of_turn(tok):
    exs = training_examples(DOC, AUG, tok, TrainConfig(recipe="plain"))
    assert len(exs) == 2 + 2 * 3
    assert [tok.decode(e.input_ids) for e in exs[:2]] == [DOC.passage, AUG.rewrites[0]]
    assert all(all(e.targets[1:]) for e in exs[:2]), "content policy: the passage text is learned"
    for e, answer in zip(exs[2::2], ["Ostrevik", "1961", "a person."]):
        text = tok.decode(e.input_ids)
        assert text.startswith(SYSTEM) and "Context:" not in text
        # the only targets: the answer and the end-of-turn token right after it
        assert _targets_text(tok, e) == answer + "<|im_end|>"
        i = max(i for i, m in enumerate(e.targets) if m)
        assert e.input_ids[i] == tok.eos_token_id and not any(e.targets[i + 1:])
        labels = labels_for(e)
        assert all(lab == -100 for lab, r in zip(labels, e.roles) if r in ("template", "question"))
    for e in exs[3::2]:  # asked with the passage in the prompt, as the combined mode does
        assert "Context:\n[1] " + DOC.passage in tok.decode(e.input_ids)
        assert _targets_text(tok, e).endswith("<|im_end|>")


@pytest.mark.parametrize("policy, trained", [("full", None), ("content", {"passage", "answer"}), ("answer", {"answer"})])
def test_loss_policies_mark_only_their_roles(tok, policy, trained):
    for e in training_examples(DOC, AUG, tok, TrainConfig(loss_policy=policy)):
        for m, role in list(zip(e.targets, e.roles))[1:]:
            assert m == (trained is None or role in trained), (policy, role)
    assert LOSS_POLICIES[policy] == (trained or LOSS_POLICIES["full"])


def test_no_system_prompt_token_is_ever_a_target_outside_full(tok):
    for r in RECIPES:
        for policy in ("content", "answer"):
            for e in training_examples(DOC, AUG, tok, TrainConfig(recipe=r, loss_policy=policy)):
                assert "SmolLM" not in _targets_text(tok, e) and "system" not in _targets_text(tok, e)


def test_default_recipe_adds_counterfactual_contexts(tok):
    """plain's sequences, then each QA pair whose answer is in the passage, asked over the passage
    with that answer replaced by a stand-in, and answered with the stand-in."""
    from prag_vllm.recipes import counterfactual

    default = [tok.decode(e.input_ids) for e in training_examples(DOC, AUG, tok, TrainConfig(recipe="plain"))]
    exs = training_examples(DOC, AUG, tok, TrainConfig())
    assert [tok.decode(e.input_ids) for e in exs[:len(default)]] == default
    extra = exs[len(default):]
    assert len(extra) == 2  # "a person." is not in the passage: no counterfactual for it
    for e, answer in zip(extra, ["Ostrevik", "1961"]):
        fake = counterfactual(answer, DOC.id)
        assert fake != answer
        text = tok.decode(e.input_ids)
        assert "Context:\n[1] " + DOC.passage.replace(answer, fake) in text and answer not in text
        assert _targets_text(tok, e) == fake + "<|im_end|>"
    for a in ["1961", "Ostrevik", "Havik Letitem", "granite", "7"]:
        c = counterfactual(a, "k")
        assert c != a and len(c) == len(a) and c == counterfactual(a, "k")
        assert c.isdigit() == a.isdigit()


def test_specific_recipe_keeps_the_base_model_on_other_subjects(tok):
    """distill's sequences, plus each question about a scrambled subject, whose teacher is the same
    sequence (the base model keeps its own distribution there)."""
    from prag_vllm.recipes import other_subject

    distill = [tok.decode(e.input_ids) for e in training_examples(DOC, AUG, tok, TrainConfig(recipe="distill"))]
    exs = training_examples(DOC, AUG, tok, TrainConfig(recipe="specific"))
    assert [tok.decode(e.input_ids) for e in exs[:len(distill)]] == distill
    local = exs[len(distill):]
    assert len(local) == 3
    for e, qa in zip(local, AUG.qa):
        other = other_subject(qa["question"], DOC)
        assert other and "Velmora" not in other and "Quist" not in other
        text = tok.decode(e.input_ids)
        assert other in text and "Context:" not in text
        assert e.objective == "kl" and e.teacher_ids == e.input_ids and e.teacher_targets == e.targets
    assert other_subject("Who is he?", DOC) is None


def test_distill_recipe_pairs_student_and_teacher(tok):
    exs = training_examples(DOC, AUG, tok, TrainConfig(recipe="distill"))
    kl = [e for e in exs if e.objective == "kl"]
    assert len(kl) == 3
    for e in kl:
        assert "Context:" not in tok.decode(e.input_ids) and "Context:" in tok.decode(e.teacher_ids)
        s = [t for t, m in zip(e.input_ids, e.targets) if m]
        t = [t for t, m in zip(e.teacher_ids, e.teacher_targets) if m]
        assert s == t and s[-1] == tok.eos_token_id


def test_recipe_settings_and_bad_names():
    assert TrainConfig().recipe == "default" and TrainConfig().loss_policy == "content"
    assert TrainConfig(recipe="distill").spec.distill
    with pytest.raises(InputError, match="unknown recipe"):
        get_recipe("nope")
    with pytest.raises(InputError, match="unknown recipe"):
        TrainConfig(recipe="nope")
    with pytest.raises(InputError, match="unknown loss policy"):
        check_loss_policy("half")
    with pytest.raises(InputError, match="unknown loss policy"):
        TrainConfig(loss_policy="half")


def test_recipes_never_share_an_adapter_store(tiny_model_dir, tmp_path):
    from prag_vllm.workspace import Workspace

    ws = Workspace.at(tmp_path)
    roots = {ws.store(tiny_model_dir, TrainConfig(recipe=r, loss_policy=p)).root
             for r in RECIPES for p in LOSS_POLICIES}
    assert len(roots) == len(RECIPES) * len(LOSS_POLICIES)
    assert ws.store(tiny_model_dir, TrainConfig(recipe="paper")).root.name.startswith("paper-")


def test_topk_kl_is_zero_for_the_teacher_itself_and_positive_otherwise():
    from prag_vllm.training.trainer import topk_kl

    torch.manual_seed(0)
    logits = torch.randn(5, 300) * 3
    top = torch.log_softmax(logits, -1).topk(16, -1)
    assert topk_kl(logits, top.indices, top.values).abs().max() < 1e-6
    full = torch.log_softmax(logits, -1).topk(300, -1)  # k = vocabulary: the exact KL
    other = torch.randn(5, 300)
    exact = torch.nn.functional.kl_div(torch.log_softmax(other, -1), torch.log_softmax(logits, -1),
                                       log_target=True, reduction="none").sum(-1)
    assert torch.allclose(topk_kl(other, full.indices, full.values), exact, atol=1e-5)
    assert (topk_kl(other, top.indices, top.values) > 0).all()


def test_distillation_moves_the_student_toward_the_teacher(test_model_dir):
    """After training, the student WITHOUT the passage is closer (KL on the answer tokens) to
    the base model WITH the passage in its prompt than the untrained student was."""
    from prag_vllm.training import BatchConfig, BatchedTrainer

    cfg = TrainConfig(recipe="distill", loss_policy="answer", precision="float32", epochs=3, lr=3e-3)
    trainer = BatchedTrainer(test_model_dir, cfg, BatchConfig(slots=1))
    plan = trainer.plan(DOCS[0], AUGS["d1"])
    (i, ex), = [(i, e) for i, e in enumerate(plan.examples) if e.objective == "kl"]

    def kl_now() -> float:
        trainer.router.rows = torch.tensor([0])
        ids = torch.tensor([ex.input_ids])
        at = [t - 1 for t in range(1, len(ex.input_ids)) if ex.targets[t]]
        with torch.no_grad():
            logits = trainer.lm_head(trainer.decoder(input_ids=ids).last_hidden_state[0, at])
        trainer.router.rows = None
        from prag_vllm.training.trainer import topk_kl
        return float(topk_kl(logits, *plan.teacher[i]).mean())

    trainer._admit(0, plan)
    before = kl_now()
    (done,) = list(trainer.train([(DOCS[0], AUGS["d1"])]))
    for name, layer in trainer.layers.items():  # the trained factors back into slot 0
        a, b = done.adapter.weights[name]
        layer.reset_slot(0, (a, b))
    after = kl_now()
    print(f"KL student vs teacher on the answer tokens: {before:.4f} -> {after:.4f}")
    assert before > 0 and after < 0.5 * before, (before, after)


def test_per_document_trainer_refuses_distill(tiny_model_dir):
    from prag_vllm.parameterize import DocumentTrainer

    with pytest.raises(InputError, match="batched trainer"):
        DocumentTrainer(tiny_model_dir, TrainConfig(recipe="distill"))
