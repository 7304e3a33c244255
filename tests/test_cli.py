"""Bad input at the command line: one-line error, exit code != 0, nothing half-written."""

import json
import subprocess
import sys

import pytest

from conftest import DOCS, random_adapter
from prag_vllm.adapters import AdapterStore, LoraAdapter


def prag(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "prag_vllm.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


@pytest.fixture
def files(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d.to_dict()) + "\n" for d in DOCS))
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question": "Who designed the Tarnholm Bridge?"}\n')
    return tmp_path, corpus, questions


def answer(tmp, corpus, questions, *extra):
    (tmp / "model").mkdir(exist_ok=True)
    (tmp / "model" / "config.json").write_text("{}")  # never loaded: the input errors come first
    return prag("answer", "--work-dir", tmp / "ws", "--corpus", corpus, "--questions", questions,
                "--out", tmp / "out.jsonl", "--model", tmp / "model", *extra)


def assert_one_line_error(res, needle):
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.strip().splitlines() if "error" in ln.lower() or "Traceback" in ln]
    assert len(lines) == 1 and lines[0].startswith("prag: error:"), res.stderr
    assert needle in lines[0], lines[0]


def test_missing_corpus(files):
    tmp, _, q = files
    res = answer(tmp, tmp / "missing.jsonl", q)
    assert_one_line_error(res, "corpus file not found")
    assert not (tmp / "out.jsonl").exists()


@pytest.mark.parametrize("content,needle", [("", "empty"), ('{"id": "x", "title": "t"}\n', "has no 'text'")])
def test_bad_corpus_content(files, content, needle):
    tmp, corpus, q = files
    corpus.write_text(content)
    assert_one_line_error(answer(tmp, corpus, q), needle)
    assert not (tmp / "out.jsonl").exists() and not (tmp / "ws" / "index").exists()


@pytest.mark.parametrize("extra,needle", [(("--mode", "telepathic"), "unknown mode 'telepathic'"),
                                          (("--top-k", "0"), "top-k must be between 1"),
                                          (("--top-k", "-2"), "top-k must be between 1"),
                                          (("--top-k", "three"), "top-k must be an integer")])
def test_bad_flags(files, extra, needle):
    tmp, corpus, q = files
    assert_one_line_error(answer(tmp, corpus, q, *extra), needle)
    assert not (tmp / "out.jsonl").exists()


@pytest.mark.parametrize("row,needle", [({"question": "q", "mode": "nope"}, "unknown mode"),
                                        ({"question": "q", "k": 0}, "top-k must be between 1"),
                                        ({"id": 1}, "has no 'question'")])
def test_bad_question_rows(files, row, needle):
    tmp, corpus, q = files
    q.write_text(json.dumps(row) + "\n")
    assert_one_line_error(answer(tmp, corpus, q), needle)
    assert not (tmp / "out.jsonl").exists()


def test_unknown_model_named(files):
    tmp, corpus, q = files
    res = prag("answer", "--work-dir", tmp / "ws", "--corpus", corpus, "--questions", q, "--out", tmp / "o.jsonl",
               "--model", "not-a-model")
    assert_one_line_error(res, "not-a-model")
    assert not (tmp / "ws").exists(), "rejected before anything was written"


def test_merge_command(tiny_model_dir, tmp_path):
    store = AdapterStore(tmp_path / "store")
    for i, d in enumerate(("a", "b", "c")):
        store.save(d, random_adapter(tiny_model_dir, seed=i))
    res = prag("merge", "--store", store.root, "--doc-id", "a", "--doc-id", "c", "--out", tmp_path / "m",
               "--merge-policy", "sum")
    assert res.returncode == 0, res.stderr
    assert LoraAdapter.load(tmp_path / "m").r == 4
    res = prag("merge", "--store", store.root, "--doc-id", "a", "--doc-id", "c", "--out", tmp_path / "mean")
    assert res.returncode == 0, res.stderr  # mean: the default
    mean = LoraAdapter.load(tmp_path / "mean")
    assert mean.meta["policy"] == "mean" and mean.scaling == pytest.approx(LoraAdapter.load(tmp_path / "m").scaling / 2)
    res = prag("merge", "--store", store.root, "--doc-id", "a", "--doc-id", "zzz", "--out", tmp_path / "m2")
    assert_one_line_error(res, "no adapter for document(s) ['zzz']")
    assert not (tmp_path / "m2").exists()


def test_index_command(files):
    tmp, corpus, _ = files
    res = prag("index", "--work-dir", tmp / "ws", "--corpus", corpus)
    assert res.returncode == 0 and "indexed 4 documents" in res.stdout


@pytest.mark.parametrize("cmd, extra, needle", [
    ("parameterize", ["--recipe", "nope"], "unknown recipe"),
    ("parameterize", ["--loss-policy", "half"], "unknown loss policy"),
    ("parameterize", ["--epochs", "0"], "positive integer"),
    ("parameterize", ["--merge-partners", "-1"], "whole number >= 0"),
    ("parameterize", ["--merge-partners", "2", "--trainer", "per-doc"], "batched trainer"),
    ("eval", ["--merge-partners", "two"], "whole number >= 0"),
    ("demo", ["--recipe", "nope"], "unknown recipe"),
    ("eval", ["--recipe", "nope"], "unknown recipe"),
    ("eval", ["--loss-policy", "half"], "unknown loss policy"),
])
def test_bad_recipe_settings(files, cmd, extra, needle):
    tmp, corpus, questions = files
    args = {"parameterize": ["--work-dir", tmp / "ws", "--corpus", corpus],
            "demo": ["--work-dir", tmp / "demo"],
            "eval": ["--dataset", questions, "--out", tmp / "ev"]}[cmd]
    res = prag(cmd, *args, *extra)
    assert res.returncode == 2
    assert_one_line_error(res, needle)
    assert not (tmp / "ws").exists() and not (tmp / "demo").exists() and not (tmp / "ev").exists()
