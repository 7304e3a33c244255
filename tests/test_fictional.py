"""The fictional-knowledge benchmark (``prag bench-data fictional``): stdlib only, no model, fast."""

import itertools
import json
import re

import pytest

from prag_vllm.benchdata.cli import main
from prag_vllm.benchdata.fictional import BLOCKED, SEED_CLASSES, generate, word_class, write
from prag_vllm.corpus import load_corpus
from prag_vllm.errors import InputError
from prag_vllm.pipeline import load_questions

FILES = ["corpus.jsonl", "meta.json", "questions.jsonl"]


@pytest.fixture(scope="module")
def sets():
    return {seed: generate(60, seed) for seed in range(6)}


def test_same_seed_same_bytes(tmp_path):
    a, b = write(generate(40, 3), tmp_path / "a"), write(generate(40, 3), tmp_path / "b")
    for name in FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert generate(40, 4).documents != generate(40, 3).documents


def test_seeds_have_disjoint_names(sets):
    titles = {s: {d["title"] for d in fs.documents} for s, fs in sets.items()}
    tokens = {s: set(re.findall(r"[A-Z][a-z]+", " ".join(d["text"] for d in fs.documents))) for s, fs in sets.items()}
    for s, fs in sets.items():
        assert all(word_class(w) == s for w in fs.words)  # the seed is encoded in every invented word
        assert set(fs.words) <= tokens[s]
    for a, b in itertools.combinations(sets, 2):
        assert not titles[a] & titles[b]
        assert not set(sets[a].words) & set(sets[b].words)
        assert not set(sets[a].words) & tokens[b]  # no invented word of one seed appears anywhere in another's corpus


def test_names_are_pronounceable_and_unique(sets):
    for fs in sets.values():
        assert len(set(fs.words)) == len(fs.words)
        for w in fs.words:
            assert re.fullmatch(r"[A-Z][a-z]{3,}", w), w
            assert not re.search(r"[^aeiou]{3}|[aeiou]{3}", w.lower()), w
            assert w.lower() not in BLOCKED
        titles = [d["title"] for d in fs.documents]
        ids = [d["id"] for d in fs.documents]
        assert len(set(titles)) == len(titles) and len(set(ids)) == len(ids)


def test_every_answer_is_in_its_gold_document(sets):
    for fs in sets.values():
        docs = {d["id"]: d for d in fs.documents}
        for q in fs.questions:
            assert q["answers"] and all(a.strip() and len(a.split()) <= 5 for a in q["answers"]), q
            assert all(d in docs for d in q["docs"]), q
            first, last = docs[q["docs"][0]], docs[q["docs"][-1]]
            assert first["title"] in q["question"], q  # names its entity in full
            assert all(a in last["text"] for a in q["answers"]), (q, last)
            if q["type"] == "single-hop":
                assert len(q["docs"]) == 1
            else:
                assert q["type"] == "two-hop" and len(q["docs"]) == 2 and first is not last, q
                assert last["title"] in first["text"], (q, first)  # the first document names the bridge entity
                assert not any(a in first["text"] for a in q["answers"]), q  # it needs the second document


def test_questions_mix_and_uniqueness(sets):
    for fs in sets.values():
        qs = fs.questions
        assert len(qs) == 120  # default: 2 x documents
        types = [q["type"] for q in qs]
        assert abs(types.count("single-hop") - types.count("two-hop")) <= 1
        assert len({q["id"] for q in qs}) == len(qs)
        assert len({q["question"] for q in qs}) == len(qs)
        assert fs.meta["questions_by_type"] == {"single-hop": types.count("single-hop"),
                                                "two-hop": types.count("two-hop")}


def test_documents_are_short_prose(sets):
    for fs in sets.values():
        for d in fs.documents:
            n = d["text"].count(". ") + 1
            assert 2 <= n <= 4 and d["text"].endswith("."), d
            assert d["text"].startswith((d["title"], "The " + d["title"])), d


def test_sizes_and_bad_arguments():
    small = generate(4, 0)
    assert len(small.documents) == 4 and len(small.questions) == 8
    assert {q["type"] for q in small.questions} == {"single-hop", "two-hop"}
    big = generate(2000, 7, 500)
    assert len(big.documents) == 2000 and len(big.questions) == 500
    for bad in [(3, 0), (0, 0), (4, -1), (4, SEED_CLASSES), (4, 0, 0), (4, 0, 10_000)]:
        with pytest.raises(InputError):
            generate(*bad)


def test_written_files_load(tmp_path):
    out = write(generate(40, 0, 80), tmp_path / "set")
    assert sorted(p.name for p in out.iterdir()) == FILES
    assert len(load_corpus(out / "corpus.jsonl")) == 40
    questions = load_questions(out / "questions.jsonl")
    assert len(questions) == 80 and all(q.answers and q.type in ("single-hop", "two-hop") for q in questions)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["seed"] == 0 and meta["n_documents"] == 40 and meta["n_questions"] == 80 and meta["version"]
    with pytest.raises(InputError, match="not empty"):
        write(generate(4, 0), out)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prag: error:"), err
    return err[0]


BAD = [["--docs", "0"], ["--docs", "3"], ["--docs", "abc"], ["--docs", "10", "--seed", "-1"],
       ["--docs", "4", "--seed", "1000"], ["--docs", "4", "--questions", "100000"], ["--docs", "4", "--questions", "0"],
       ["--out-typo", "x"]]


@pytest.mark.parametrize("extra", BAD)
def test_cli_bad_input_writes_nothing(tmp_path, capsys, extra):
    assert main(["fictional", "--out", str(tmp_path / "out" / "set"), *extra]) == 2
    _one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []


def test_cli_unwritable_or_used_out_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["fictional", "--docs", "8", "--out", str(blocker / "set")]) == 2
    assert "not a directory" in _one_line_error(capsys)
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    assert main(["fictional", "--docs", "8", "--out", str(used)]) == 2
    assert "not empty" in _one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "used"]
    assert [p.name for p in used.iterdir()] == ["keep.txt"] and blocker.read_text() == "x"


def test_cli_writes_the_three_files(tmp_path, capsys):
    out = tmp_path / "deep" / "set"
    assert main(["fictional", "--docs", "12", "--seed", "2", "--out", str(out)]) == 0
    assert "12 documents and 24 questions" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == FILES
    assert [p.name for p in (tmp_path / "deep").iterdir()] == ["set"]  # no temporary directory left behind
    assert json.loads((out / "meta.json").read_text())["seed"] == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["fictional", "--docs", "12", "--seed", "2", "--questions", "10", "--out", str(empty)]) == 0
    assert (empty / "corpus.jsonl").read_bytes() == (out / "corpus.jsonl").read_bytes()
    assert len((empty / "questions.jsonl").read_text().splitlines()) == 10
