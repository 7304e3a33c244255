"""Augmentation: robust QA parsing, retries, skip-with-warning, batching and resume."""

import json
import logging

from conftest import DOCS
from prag_vllm.augment import AugmentConfig, augment_corpus, keeps_numbers, load_augmentations, parse_qa


class FakeLLM:
    """Scripted ChatGenerator: records every batch; QA replies come from ``qa_reply(doc_text, attempt)``."""

    def __init__(self, qa_reply):
        self.calls = []
        self.qa_reply = qa_reply
        self.attempts = {}

    def chat(self, conversations, *, max_tokens, temperature=0.0, seed=None):
        self.calls.append(len(conversations))
        outs = []
        for conv in conversations:
            text = conv[-1]["content"]
            passage = text.split("Passage:\n", 1)[1]
            if text.startswith("Rewrite"):
                outs.append("Rewritten: " + passage)
            else:
                n = self.attempts[passage] = self.attempts.get(passage, 0) + 1
                outs.append(self.qa_reply(passage, n))
        return outs


GOOD = '[{"question": "Q1?", "answer": "A1"}, {"question": "Q2?", "answer": "A2"}]'


def good(passage: str) -> str:
    """Three usable QA pairs (``usable_qa``): each question names the passage's subject (its first
    word, the title's), each answer is words of the passage that the question does not contain."""
    w = passage.split()
    return json.dumps([{"question": f"Q{i} about {w[0]}?", "answer": " ".join(w[-1 - i:len(w) - i])}
                       for i in range(3)])


def test_parse_qa_formats():
    assert parse_qa("Sure! " + GOOD + " Done.", 3) == [{"question": "Q1?", "answer": "A1"}, {"question": "Q2?", "answer": "A2"}]
    lines = "1. Question: Who?\nAnswer: Bob\n2. Question: When?\nAnswer: 1990\n"
    assert parse_qa(lines, 3) == [{"question": "Who?", "answer": "Bob"}, {"question": "When?", "answer": "1990"}]
    assert parse_qa(GOOD, 1) == [{"question": "Q1?", "answer": "A1"}]
    for bad in ["", "no idea", "[{broken json", '[{"question": "", "answer": "x"}]', '[1, 2]', '{"question": "q"}']:
        assert parse_qa(bad, 3) == []


def test_keeps_numbers():
    assert keeps_numbers("born 14 March 1961, 3,412 m", "in 1961 (14 March), 3,412 m high")
    assert not keeps_numbers("born 14 March 1961", "born in March")


def test_malformed_output_does_not_abort(tmp_path, caplog):
    bad_doc = DOCS[1].passage

    def reply(passage, attempt):
        if passage == bad_doc:
            return "I cannot do that."           # never parses
        return "garbage" if attempt == 1 else good(passage)  # parses on the retry

    llm = FakeLLM(reply)
    with caplog.at_level(logging.WARNING):
        out = augment_corpus(DOCS, llm, tmp_path / "aug.jsonl", AugmentConfig(batch_size=4, max_retries=2))
    assert set(out) == {d.id for d in DOCS}
    assert out["d2"].qa_failed and out["d2"].qa == []
    assert all(out[d].qa and not out[d].qa_failed for d in ("d1", "d3", "d4"))
    assert any("no usable QA pair" in r.message and "d2" in r.message for r in caplog.records)
    # batched: 1 rewrite call + 3 QA attempts for the batch of 4, not one call per document
    assert llm.calls == [4, 4, 4, 1]
    assert out["d1"].rewrites == ["Rewritten: " + DOCS[0].passage]


def test_resume_skips_done_documents(tmp_path):
    path = tmp_path / "aug.jsonl"
    augment_corpus(DOCS[:2], FakeLLM(lambda p, n: good(p)), path, AugmentConfig(batch_size=8))
    with open(path, "a") as fh:
        fh.write('{"id": "d3", "rewr')  # a torn line from a crash
    llm = FakeLLM(lambda p, n: good(p))
    out = augment_corpus(DOCS, llm, path, AugmentConfig(batch_size=8))
    assert llm.calls == [2, 2], "only the two unfinished documents are generated"
    assert set(load_augmentations(path)) == {d.id for d in DOCS}
    assert len(out) == 4


def test_unusable_pairs_are_dropped_and_the_rest_asked_again(tmp_path):
    """Pairs whose answer the passage lacks, whose question contains its answer, or whose question
    does not name the subject are dropped; a document with fewer than n_qa usable pairs is asked
    again (with sampling) and its usable pairs accumulate over the tries."""
    def reply(passage, attempt):
        subject, last = passage.split()[0], passage.split()[-1]
        if attempt == 1:
            return json.dumps([{"question": f"Is {subject} in Atlantis?", "answer": "Atlantis"},   # not in passage
                               {"question": f"Is {subject} {last}?", "answer": last},              # answer in question
                               {"question": "What is the name of it?", "answer": last},           # no subject
                               {"question": f"Where is {subject}?", "answer": last}])             # usable
        return json.dumps([{"question": f"Where is {subject}?", "answer": last},                   # a repeat
                           {"question": f"When was {subject} {attempt}?", "answer": passage.split()[1]}])

    llm = FakeLLM(reply)
    out = augment_corpus(DOCS[:2], llm, tmp_path / "aug.jsonl", AugmentConfig(batch_size=4, max_retries=2, n_qa=3))
    assert llm.calls == [2, 2, 2, 2]
    for d in DOCS[:2]:
        subject, last, second = d.passage.split()[0], d.passage.split()[-1], d.passage.split()[1]
        assert out[d.id].qa == [{"question": f"Where is {subject}?", "answer": last},
                                {"question": f"When was {subject} 2?", "answer": second},
                                {"question": f"When was {subject} 3?", "answer": second}]
        assert not out[d.id].qa_failed


def test_usable_qa():
    from prag_vllm.augment import names_subject, usable_qa
    from prag_vllm.corpus import Document

    doc = Document("x", "Lothar Ehrlich (politician)", "Lothar Ehrlich was born in Gera in 1911.")
    assert usable_qa({"question": "Where was Lothar Ehrlich born?", "answer": "Gera"}, doc)
    assert usable_qa({"question": "When was Ehrlich born?", "answer": "1911"}, doc)
    assert not usable_qa({"question": "Where was he born?", "answer": "Gera"}, doc)
    assert not usable_qa({"question": "Was Lothar Ehrlich born in Gera?", "answer": "Gera"}, doc)
    assert not usable_qa({"question": "Where did Lothar Ehrlich die?", "answer": "Berlin"}, doc)
    assert not names_subject("Who was the politician?", doc), "the parenthesised qualifier is not the subject"
    assert names_subject("Anything?", Document("y", "", "No title here."))


def test_answer_in_passage():
    from prag_vllm.augment import answer_in_passage

    text = "The Tarnholm Bridge over the river Sevlin was designed by Odile Brask in 1887."
    assert answer_in_passage("Odile Brask", text) and answer_in_passage("the river Sevlin.", text)
    assert answer_in_passage("1887", text) and not answer_in_passage("188", text)
    assert not answer_in_passage("Brask Odile", text) and not answer_in_passage("", text)


def test_distinct_answers_keeps_one_pair_per_fact(tmp_path):
    """With ``distinct_answers`` a pair whose answer an earlier pair has is dropped, and the
    document is asked again for another fact; the augmentation log is a separate file."""
    from prag_vllm.evaluation.run import _augmentations_path

    def reply(passage, attempt):
        w = passage.split()
        return json.dumps([{"question": f"Where is {w[0]}?", "answer": w[-1]},
                           {"question": f"Where was {w[0]} seen?", "answer": w[-1]},       # the same fact
                           {"question": f"What about {w[0]} {attempt}?", "answer": w[-1 - attempt]}])

    cfg = AugmentConfig(batch_size=4, max_retries=2, n_qa=3, distinct_answers=True)
    out = augment_corpus(DOCS[:1], FakeLLM(reply), tmp_path / "aug.jsonl", cfg)
    w = DOCS[0].passage.split()
    assert [p["answer"] for p in out["d1"].qa] == [w[-1], w[-2], w[-3]]
    same = augment_corpus(DOCS[:1], FakeLLM(reply), tmp_path / "aug2.jsonl", AugmentConfig(n_qa=3))
    assert [p["answer"] for p in same["d1"].qa] == [w[-1], w[-1], w[-2]], "off by default: questions decide"

    class Run:
        class ws:
            root = tmp_path
    assert _augmentations_path(Run, "m", cfg) != _augmentations_path(Run, "m", AugmentConfig(n_qa=3))
