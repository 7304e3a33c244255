"""Dataset loaders: the real files in shared/data and small hand-made files, incl. malformed ones."""

import json

import pytest

from conftest import SHARED_DATA
from prag_vllm.corpus import load_corpus
from prag_vllm.datasets import FORMATS, detect_format, load_dataset, select_questions, subtype_order
from prag_vllm.errors import InputError
from prag_vllm.pipeline import load_questions

HOTPOT = SHARED_DATA / "hotpotqa" / "dev_distractor_sample.json"
WIKI2 = SHARED_DATA / "2wikimultihopqa" / "dev_sample.json"
POPQA = SHARED_DATA / "popqa" / "test_sample.jsonl"
CWQ = SHARED_DATA / "complexwebquestions" / "dev_first500.json"


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# -- the real files ---------------------------------------------------------------------
def test_real_hotpotqa():
    ds = load_dataset(HOTPOT)
    assert ds.name == "hotpotqa" and len(ds.questions) == 250
    assert {q.type for q in ds.questions} == {"bridge", "comparison"}
    raw = json.loads(HOTPOT.read_text())
    q = ds.questions[0]
    assert (q.id, q.question, q.answers, q.type) == (raw[0]["_id"], raw[0]["question"], [raw[0]["answer"]], raw[0]["type"])
    # closed corpus: every question's paragraphs pooled, deduplicated by title + text
    pairs = {(t, "".join(s).strip()) for item in raw for t, s in item["context"]}
    assert len(ds.documents) == len(pairs) < sum(len(item["context"]) for item in raw)
    assert [d.id for d in ds.documents] == [d.id for d in load_corpus(HOTPOT)]


def test_real_2wiki():
    ds = load_dataset(WIKI2)
    assert ds.name == "2wikimultihopqa" and len(ds.questions) == 250
    assert {q.type for q in ds.questions} == {"comparison", "inference", "compositional", "bridge_comparison"}
    assert subtype_order(ds, ds.questions) == ["comparison", "bridge_comparison", "inference", "compositional"]
    assert all(q.answers and q.answers[0] for q in ds.questions)
    # 2Wiki sentences carry no leading space: they must not be glued together
    multi = next(d for d in ds.documents if d.title == "Fernando Fernán Gómez")
    assert "seven years. He was born" in multi.text
    titles = {d.title for d in ds.documents}
    assert all(t in titles for item in json.loads(WIKI2.read_text()) for t, _ in item["supporting_facts"])


def test_real_popqa():
    ds = load_dataset(POPQA)
    assert ds.name == "popqa" and len(ds.questions) == 500 and ds.documents is None
    q = ds.questions[0]
    assert q.id == "test_3" and q.answers[:2] == ["politician", "political leader"] and q.type is None


def test_real_cwq():
    ds = load_dataset(CWQ)
    assert ds.name == "complexwebquestions" and len(ds.questions) == 500 and ds.documents is None
    raw = json.loads(CWQ.read_text())
    many = next(i for i, r in enumerate(raw) if len(r["answer"]) > 3)
    assert ds.questions[many].answers == list(dict.fromkeys(a.strip() for a in raw[many]["answer"]))
    assert ds.questions[many].id == str(raw[many]["test_id"])


def test_detect_all_real_files():
    assert [detect_format(p) for p in (HOTPOT, WIKI2, POPQA, CWQ)] == [
        "hotpotqa", "2wikimultihopqa", "popqa", "complexwebquestions"]


# -- hand-made files --------------------------------------------------------------------
POPQA_TSV = ("id\tsubj\tprop\tobj\ts_pop\tquestion\tpossible_answers\n"
             '7\tAda\toccupation\tpoet\t12\tWhat is Ada\'s occupation?\t["poet", "lyricist"]\n'
             '9\tOslo\tcountry\tNorway\t900\tIn what country is Oslo?\t["Norway", "Kingdom of Norway"]\n')


def test_popqa_tsv_with_json_encoded_answers(tmp_path):
    path = write(tmp_path, "popQA.tsv", POPQA_TSV)
    assert detect_format(path) == "popqa"
    ds = load_dataset(path)
    assert [(q.id, q.question, q.answers) for q in ds.questions] == [
        ("7", "What is Ada's occupation?", ["poet", "lyricist"]),
        ("9", "In what country is Oslo?", ["Norway", "Kingdom of Norway"])]


def test_popqa_jsonl_possible_answers_string(tmp_path):
    rows = [{"id": 1, "question": "Who wrote X?", "possible_answers": '["A. Writer", "Writer"]'}]
    path = write(tmp_path, "popqa.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    assert load_dataset(path).questions[0].answers == ["A. Writer", "Writer"]


def test_cwq_original_format(tmp_path):
    rows = [{"ID": "WebQTrn-1_abc", "question": "What language is spoken where X lives?", "machine_question": "m",
             "compositionality_type": "composition",
             "answers": [{"answer": "Jamaican English", "answer_id": "m.01", "aliases": ["English"]},
                         {"answer": "Jamaican Creole", "answer_id": "m.02", "aliases": []}]}]
    path = write(tmp_path, "ComplexWebQuestions_dev.json", json.dumps(rows))
    q = load_dataset(path).questions[0]
    assert (q.id, q.type, q.answers) == ("WebQTrn-1_abc", "composition", ["Jamaican English", "English", "Jamaican Creole"])


def test_hand_made_hotpot_and_2wiki(tmp_path):
    ctx = [["Alpha", ["Alpha is a town.", " It has a bridge."]], ["Beta", ["Beta is a river."]]]
    hot = [{"_id": "h1", "question": "Q1?", "answer": "yes", "type": "comparison", "level": "easy",
            "supporting_facts": [["Alpha", 0]], "context": ctx},
           {"_id": "h2", "question": "Q2?", "answer": "Alpha", "type": "bridge", "level": "hard",
            "supporting_facts": [], "context": ctx[:1]}]
    path = write(tmp_path, "hotpot.json", json.dumps(hot))
    ds = load_dataset(path)
    assert ds.name == "hotpotqa" and [d.id for d in ds.documents] == ["Alpha", "Beta"]
    assert ds.documents[0].text == "Alpha is a town. It has a bridge."
    wiki = [dict(h, type="inference", evidences=[]) for h in hot]
    assert load_dataset(write(tmp_path, "wiki.json", json.dumps(wiki))).name == "2wikimultihopqa"
    forced = load_dataset(path, "2wikimultihopqa")
    assert forced.name == "2wikimultihopqa" and len(forced.questions) == 2


def test_generic_jsonl_keeps_type_and_matches_load_questions(tmp_path):
    rows = [{"id": "a", "question": "Q?", "answers": ["x", "y"], "type": "t1"},
            {"question": "R?", "answer": 1963}]
    path = write(tmp_path, "q.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    ds = load_dataset(path)
    assert ds.name == "jsonl" and ds.questions == load_questions(path)
    assert [(q.id, q.answers, q.type) for q in ds.questions] == [("a", ["x", "y"], "t1"), ("2", ["1963"], None)]


@pytest.mark.parametrize("name,text,needle", [
    ("empty.json", "", "empty"),
    ("bad.json", '[{"question": "Q", ', "not valid JSON"),
    ("obj.json", '{"data": [1, 2]}\n', "unknown dataset format"),
    ("nolist.json", "[1, 2]", "not a JSON object"),
    ("unknown.json", '[{"foo": 1}]', "unknown dataset format"),
    ("noanswer.json", '[{"_id": "1", "question": "Q?", "answer": " ", "context": [], "type": "bridge"}]',
     "no gold answer"),
    ("badctx.json", '[{"_id": "1", "question": "Q?", "answer": "a", "context": [["T", "not a list"]]}]', "context"),
    ("noq.jsonl", '{"question": "", "answers": ["a"]}\n', "no 'question'"),
    ("dup.jsonl", '{"id": 1, "question": "Q", "answers": ["a"]}\n{"id": 1, "question": "R", "answers": ["b"]}\n',
     "duplicate"),
    ("bad.tsv", "id\tquestion\tpossible_answers\n1\tQ?\t[\"a\", \n", "not a valid JSON list"),
    ("short.tsv", "id\tquestion\tpossible_answers\n1\tQ?\n", "columns"),
    ("plain.txt", "just some text\n", "not a recognised"),
])
def test_malformed_files_raise_input_error(tmp_path, name, text, needle):
    path = write(tmp_path, name, text)
    with pytest.raises(InputError, match=needle):
        load_dataset(path)


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(InputError, match="unknown dataset format"):
        load_dataset(HOTPOT, "squad")
    with pytest.raises(InputError, match="not found"):
        load_dataset(tmp_path / "nope.json")
    assert list(FORMATS)[-1] == "jsonl"  # the generic format is tried last


def test_select_first_n_and_per_type():
    qs = load_dataset(WIKI2).questions
    assert select_questions(qs, limit=5) == qs[:5]
    picked = select_questions(qs, per_type=3)
    assert len(picked) == 12 and all(sum(q.type == t for q in picked) == 3 for t in {q.type for q in qs})
    assert [qs.index(q) for q in picked] == sorted(qs.index(q) for q in picked)  # file order kept
    with pytest.raises(InputError):
        select_questions(qs, limit=1, per_type=1)
