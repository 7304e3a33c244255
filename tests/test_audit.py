"""Clean answers are measured: template leaks and answers cut at max_tokens."""

import pytest

from prag_vllm.audit import AnswerAudit, count


@pytest.fixture(scope="module")
def audit(test_model_dir):
    from transformers import AutoTokenizer

    return AnswerAudit.for_tokenizer(AutoTokenizer.from_pretrained(test_model_dir))


@pytest.mark.parametrize("text", [
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face",  # the template's system prompt
    "Ostrevikuser", "Ostreviksystem", "1887userassistantassistant", "user", "]user\n",
    "Answer the question with a short phrase, no explanation.", "Hallow Ferry\nQuestion: Who first climbed it?",
    "Context:\n[1] Mount Orvanne", "\n[1]", "\n\n[2] Tarnholm Bridge: The Tarnholm",
])
def test_leaks_are_found(audit, text):
    assert audit.leak(text) is not None
    assert audit.check(text)["template_leak"]


@pytest.mark.parametrize("text", ["Ostrevik", "Odile Brask", "a power user", "the user interface", "14 March 1961",
                                  "Paris, France", "The assistant coach"])
def test_clean_answers_pass(audit, text):
    assert audit.leak(text) is None


def test_qwen_default_system_prompt_is_a_leak():
    assert AnswerAudit(fragments=["You are Qwen, created by Alibaba Cloud. You are a helpful assistant."]).leak(
        "You are Qwen, created by Alibaba Cloud. You are a helpful assistant. You are Qwen") is not None


def test_one_sentence_of_a_system_prompt_is_a_leak(monkeypatch):
    from prag_vllm import audit as mod

    class Tok:
        all_special_tokens, all_special_ids, eos_token_id = ["<|im_start|>", "<|im_end|>"], [1, 2], 2

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
                    f"<|im_start|>user\n{messages[0]['content']}<|im_end|>\n<|im_start|>assistant\n")

        def get_vocab(self):
            return {}

    audit = mod.AnswerAudit.for_tokenizer(Tok())
    assert audit.leak("Ostrevik. You are Qwen, created by Alibaba Cloud. You are Qwen") is not None
    assert audit.leak("Ostrevik") is None


def test_special_tokens_in_the_generated_ids(audit, test_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(test_model_dir)
    start = tok.convert_tokens_to_ids("<|im_start|>")
    ids = tok("Ostrevik", add_special_tokens=False)["input_ids"]
    assert audit.leak("Ostrevik", ids + [tok.eos_token_id]) is None, "the end of turn itself is fine"
    assert audit.leak("Ostrevik", ids + [start]) is not None, "decoding hid an <|im_start|>"


def test_hit_max_tokens_and_counts(audit):
    rows = [audit.check("Salt Harbour Harbour Harbour", finish_reason="length"), audit.check("Ostrevik", finish_reason="stop"),
            audit.check("Ostrevikuser", finish_reason="stop")]
    assert [r["hit_max_tokens"] for r in rows] == [True, False, False]
    assert count(rows) == {"template_leaks": 1, "hit_max_tokens": 1}
