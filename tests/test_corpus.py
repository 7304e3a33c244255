import json

import pytest

from conftest import SHARED_DATA
from prag_vllm.corpus import load_corpus
from prag_vllm.errors import InputError


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_corpus(tmp_path):
    docs = load_corpus(write(tmp_path / "c.jsonl", [{"id": "a", "title": "T", "text": "hello"}, {"id": 7, "text": "x"}]))
    assert [d.id for d in docs] == ["a", "7"]
    assert docs[0].passage == "T: hello" and docs[1].passage == "x"


@pytest.mark.parametrize("name,n_min", [("hotpotqa/dev_distractor_sample.json", 2000),
                                        ("2wikimultihopqa/dev_sample.json", 1500)])
def test_multihop_native_formats(name, n_min):
    path = SHARED_DATA / name
    docs = load_corpus(path)
    assert len(docs) >= n_min
    assert len({d.id for d in docs}) == len(docs)
    assert len({(d.title, d.text) for d in docs}) == len(docs), "deduplicated by title+text"
    data = json.loads(path.read_text())
    titles = {d.title for d in docs}
    assert all(t in titles for t, _ in data[0]["context"])


def test_multihop_dedup_and_same_title(tmp_path):
    data = [{"context": [["A", ["one. ", "two."]], ["B", ["b."]]]},
            {"context": [["A", ["one. ", "two."]], ["A", ["other."]]]}]
    path = tmp_path / "h.json"
    path.write_text(json.dumps(data))
    docs = load_corpus(path)
    assert [(d.id, d.text) for d in docs] == [("A", "one. two."), ("B", "b."), ("A#2", "other.")]


@pytest.mark.parametrize("content,message", [
    (None, "not found"),
    ("", "empty"),
    ('{"id": "a", "title": "t"}\n', "has no 'text'"),
    ('{"id": "a", "text": "  "}\n', "has no 'text'"),
    ('{"text": "x"}\n', "has no 'id'"),
    ('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n', "duplicate document id"),
    ('{"id": "a", "text": "x"}\nnot json\n', "not valid JSON"),
    ('[{"question": "q"}]', "no 'context'"),
])
def test_bad_corpus(tmp_path, content, message):
    path = tmp_path / "c.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputError, match=message):
        load_corpus(path)
