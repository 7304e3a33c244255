import pytest

from conftest import DOCS, SHARED_DATA
from prag_vllm.corpus import load_corpus
from prag_vllm.errors import InputError
from prag_vllm.retrieve import BM25Retriever


def test_top_k_and_analyzer():
    r = BM25Retriever(DOCS)
    hits = r.retrieve(["Who designed the bridge over the Sevlin?"], k=2)[0]
    assert hits[0].doc.id == "d2" and len(hits) <= 2
    assert hits == sorted(hits, key=lambda h: -h.score)
    # stemming: "climbing" matches "climbed"; stop words alone match nothing
    assert r.retrieve(["climbing"], k=1)[0][0].doc.id == "d4"
    assert r.retrieve(["the of and"], k=3) == [[]]


def test_k_larger_than_corpus_and_validation():
    r = BM25Retriever(DOCS)
    assert len(r.retrieve(["glassblower cellist bridge mountaineer"], k=50)[0]) == 4
    for bad in (0, -1, 1000, "3", 2.0):
        with pytest.raises(InputError):
            r.retrieve(["x"], k=bad)


def test_save_load_roundtrip(tmp_path):
    docs = load_corpus(SHARED_DATA / "hotpotqa/dev_distractor_sample.json")
    r = BM25Retriever.build_or_load(docs, tmp_path / "idx")
    again = BM25Retriever.build_or_load(docs, tmp_path / "idx")  # reused, not rebuilt
    queries = ["Which writer was from England, Henry Roth or Robert Erskine Childers?", "American film director"]
    a, b = r.retrieve(queries, k=3), again.retrieve(queries, k=3)
    assert [[h.doc.id for h in q] for q in a] == [[h.doc.id for h in q] for q in b]
    assert a[0][0].doc.id == "Robert Erskine Childers"
    assert not list(tmp_path.glob("idx/*.tmp")), "no temporary files left behind"


def test_index_rebuilt_when_corpus_changes(tmp_path):
    BM25Retriever.build_or_load(DOCS[:2], tmp_path / "idx")
    r = BM25Retriever.build_or_load(DOCS, tmp_path / "idx")
    assert len(BM25Retriever.load(tmp_path / "idx")) == len(r) == 4


def test_missing_index(tmp_path):
    with pytest.raises(InputError, match="no BM25 index"):
        BM25Retriever.load(tmp_path / "nope")
