"""``--executor ray``: the offline work on a (local) Ray cluster gives the local run's results.

- parameterization by 2 trainer actors: every adapter bit-identical to the single-process
  batched trainer's (float32, tiny model);
- a trainer actor killed (kill -9) mid-run: the run finishes, every adapter validates, one
  adapter per document, a rerun trains nothing;
- the CLI (``prag parameterize --executor ray``) into a workspace, resumable;
- augmentation and batch answering by 2 vLLM engine actors (test model, float32): the same
  augmentations and the same answers, row for row, as the session's local engine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import pytest
import torch

from conftest import AUGS, DOCS
from prag_vllm.adapters import AdapterStore
from prag_vllm.augment import Augmentation
from prag_vllm.corpus import Document
from prag_vllm.parameterize import TrainConfig
from prag_vllm.training import BatchConfig

CFG = TrainConfig(epochs=2, lr=3e-3, precision="float32")
MORE = [Document(f"x{i}", f"Harbour {i}", f"The harbour of Quell {i} was dredged in {1900 + i} by the firm Osk {i}.")
        for i in range(8)]
MORE_AUGS = {d.id: Augmentation(d.id, rewrites=[f"In {1900 + i} the firm Osk {i} dredged the harbour of Quell {i}."],
                                qa=[{"question": f"Who dredged the harbour of Quell {i}?", "answer": f"Osk {i}"}])
             for i, d in enumerate(MORE)}
ALL = DOCS + MORE
ALL_AUGS = {**AUGS, **MORE_AUGS}


@pytest.fixture(scope="module")
def executor():
    """One local Ray cluster for the module (2 CPUs: the actors' reservations)."""
    from prag_vllm.executors import ExecutorConfig, get_executor

    with get_executor(ExecutorConfig(kind="ray", actors=2, chunk_documents=2)) as ex:
        yield ex


def _visible(store: AdapterStore) -> list:
    return [p for p in (store.root / "docs").iterdir() if not p.name.startswith(".")]


def test_split_covers_in_order():
    from prag_vllm.executors.ray_cluster import split

    assert split(5, 2) == [(0, 3), (3, 5)]
    assert split(1, 3) == [(0, 1), (1, 1), (1, 1)]
    for n in range(7):
        for parts in range(1, 4):
            ranges = split(n, parts)
            assert [i for s, e in ranges for i in range(s, e)] == list(range(n))


def test_executor_settings_are_checked():
    from prag_vllm.errors import InputError
    from prag_vllm.executors import ExecutorConfig

    for bad in ({"kind": "slurm"}, {"actors": 0}, {"gpus_per_actor": -1}, {"address": "auto"}):
        with pytest.raises(InputError):
            ExecutorConfig(**bad)


def test_two_trainer_actors_make_the_single_process_adapters_bit_for_bit(executor, tiny_model_dir, tmp_path):
    from prag_vllm.training.driver import parameterize_batched

    batch = BatchConfig(slots=3)
    local = AdapterStore(tmp_path / "local")
    parameterize_batched(ALL, ALL_AUGS, local, tiny_model_dir, CFG, batch)
    remote = AdapterStore(tmp_path / "ray")
    summary = executor.parameterize(ALL, ALL_AUGS, remote, tiny_model_dir, CFG, batch)
    assert summary["trained"] == len(ALL) and summary["actor_processes"] == 2, summary
    for d in ALL:
        a, b = local.load(d.id), remote.load(d.id)
        assert a.weights.keys() == b.weights.keys()
        for m in a.weights:
            for i in (0, 1):
                assert torch.equal(a.weights[m][i], b.weights[m][i]), (d.id, m, i)
    again = executor.parameterize(ALL, ALL_AUGS, remote, tiny_model_dir, CFG, batch)
    assert again["trained"] == 0 and again["skipped"] == len(ALL)


def _trainer_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "ray::TrainerActor"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_a_killed_trainer_actor_is_restarted_and_the_run_finishes(executor, tiny_model_dir, tmp_path):
    """kill -9 of one trainer actor's process once the first adapters are stored: Ray restarts
    it and reruns its task, which skips what was stored; nothing half-written is visible."""
    store = AdapterStore(tmp_path / "store")
    result: dict = {}

    def run():
        try:
            result["summary"] = executor.parameterize(ALL, ALL_AUGS, store, tiny_model_dir,
                                                      TrainConfig(**{**CFG.__dict__, "epochs": 6}), BatchConfig(slots=2))
        except Exception as exc:  # noqa: BLE001 -- reported by the assertion below
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    deadline, killed = time.monotonic() + 300, None
    while thread.is_alive() and time.monotonic() < deadline:
        pids = _trainer_pids()
        if (store.root / "docs").is_dir() and _visible(store) and len(_visible(store)) < len(ALL) and pids:
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)
            break
        time.sleep(0.05)
    thread.join(timeout=600)
    assert killed is not None, "no trainer actor was seen mid-run"
    assert "error" not in result, result.get("error")
    assert killed not in _trainer_pids()
    docs = _visible(store)
    assert len(docs) == len(ALL), f"{len(docs)} adapters for {len(ALL)} documents"
    for d in ALL:
        store.load(d.id)  # checksum, owner
    again = executor.parameterize(ALL, ALL_AUGS, store, tiny_model_dir, CFG, BatchConfig(slots=2))
    print(f"killed trainer actor pid {killed}; run finished with {result['summary']['trained']} trained by the "
          f"tasks that completed, {len(docs)} adapters, rerun trained {again['trained']}")
    assert again["trained"] == 0


def test_cli_parameterize_on_ray_resumes(executor, tiny_model_dir, tmp_path, capsys):
    import json

    from prag_vllm.cli import main
    from prag_vllm.corpus import save_corpus_jsonl

    corpus = tmp_path / "corpus.jsonl"
    save_corpus_jsonl(MORE, corpus)
    common = ["parameterize", "--work-dir", str(tmp_path / "w"), "--corpus", str(corpus), "--model",
              str(tiny_model_dir), "--no-augmentation", "--epochs", "1", "--executor", "ray", "--actors", "2",
              "--chunk-documents", "2", "--precision", "float32"]
    assert main(common) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["executor"] == "ray" and first["trained"] == len(MORE) and first["actors"] == 2
    assert main(common) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second["trained"] == 0 and second["skipped"] == len(MORE)
    assert main([*common, "--trainer", "per-doc"]) == 2
    assert "runs the batched trainer" in capsys.readouterr().err


@pytest.mark.vllm
def test_engine_actors_augment_and_answer_as_the_local_engine(executor, vllm_engine, test_model_dir, tmp_path):
    """2 engine actors (the session engine's settings): augmentation and parametric / standard
    answers equal the session engine's, row for row."""
    from conftest import random_adapter
    from prag_vllm.augment import AugmentConfig, augment_corpus
    from prag_vllm.pipeline import ParametricRAG, Question
    from prag_vllm.retrieve.factory import build_retriever

    store = AdapterStore(tmp_path / "store")
    for i, d in enumerate(ALL):
        store.save(d.id, random_adapter(test_model_dir, seed=900 + i, std=0.05))
    retriever = build_retriever("bm25", ALL, index_dir=tmp_path / "index")
    questions = [Question(id=f"q{i}", question=q, answers=["x"]) for i, q in enumerate(
        ["Who designed the Tarnholm Bridge?", "When was Mount Orvanne first climbed?", "Who dredged Quell 3?",
         "Where was Velmora Quist born?", "What did Quorra Pell release?", "Who dredged the harbour of Quell 6?"])]
    cfg = AugmentConfig(n_rewrites=1, n_qa=2, batch_size=4, max_tokens=48)
    t0 = time.perf_counter()
    with executor.engine(vllm_engine.cfg) as pool:
        started = time.perf_counter() - t0
        rows = {}
        for name, engine in (("local", vllm_engine), ("ray", pool)):
            augs = augment_corpus(ALL[:5], engine, tmp_path / f"aug-{name}.jsonl", cfg)
            rag = ParametricRAG(retriever, store, engine, augs, default_k=2)
            out = rag.answer_file(questions, tmp_path / f"answers-{name}.jsonl", ["parametric", "standard"],
                                  batch_size=8, max_tokens=12)
            rows[name] = (augs, [(r["id"], r["mode"], r["generation"], r["retrieved"]) for r in out])
    assert {k: v.to_dict() for k, v in rows["local"][0].items()} == {k: v.to_dict() for k, v in rows["ray"][0].items()}
    assert rows["local"][1] == rows["ray"][1]
    assert len(rows["ray"][1]) == 2 * len(questions)
    print(f"engine actors ready in {started:.0f} s; {len(rows['ray'][1])} answers and 5 augmentations equal")


def test_bad_input_is_one_line_and_writes_nothing(executor, tiny_model_dir, tmp_path, capsys, monkeypatch):
    """An unreachable cluster, a store that cannot be written (by the driver; by a worker)."""
    from prag_vllm.cli import main
    from prag_vllm.corpus import save_corpus_jsonl
    from prag_vllm.errors import InputError
    from prag_vllm.executors import ray_cluster

    corpus = tmp_path / "corpus.jsonl"
    save_corpus_jsonl(MORE[:2], corpus)
    common = ["parameterize", "--corpus", str(corpus), "--model", str(tiny_model_dir), "--no-augmentation",
              "--epochs", "1", "--executor", "ray"]
    assert main([*common, "--work-dir", str(tmp_path / "w1"), "--ray-address", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("prag: error: cannot reach the Ray cluster at 127.0.0.1:1") and "\n" not in err, err
    (tmp_path / "w2").mkdir()
    (tmp_path / "w2" / "adapters").write_text("a file where the store's directory should be")
    assert main([*common, "--work-dir", str(tmp_path / "w2")]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not writable here" in err and "\n" not in err, err
    # a worker that cannot write (the driver's check skipped): the worker's own one-line error
    monkeypatch.setattr(ray_cluster, "check_writable", lambda root: None)
    bad = AdapterStore(tmp_path / "w2" / "adapters" / "store")
    with pytest.raises(InputError, match="is not writable here"):
        executor.parameterize(MORE[:2], {}, bad, tiny_model_dir, CFG, BatchConfig(slots=2))
    assert (tmp_path / "w2" / "adapters").is_file(), "nothing written"


def test_cli_augment_and_answer_route_through_the_ray_executor(executor, tiny_model_dir, tmp_path, capsys,
                                                               monkeypatch):
    """``--executor ray`` on ``prag augment`` / ``prag answer`` builds the Ray engine pool (here a
    stand-in with its interface: the real pool is checked above) and writes the usual files."""
    import json

    from prag_vllm.cli import main
    from prag_vllm.corpus import save_corpus_jsonl
    from prag_vllm.executors import ray_cluster
    from prag_vllm.generate import Generation

    built = []

    class Pool:
        def __init__(self, ex, cfg):
            assert isinstance(ex, ray_cluster.RayExecutor) and ex.config.actors == 3
            built.append(cfg)
            self.tokenizer = None

        def generate(self, conversations, adapters=None, **kw):
            return [Generation(text="Osk 1.", token_ids=[1], prompt_tokens=3, finish_reason="stop")
                    for _ in conversations]

        def chat(self, conversations, **kw):
            return [json.dumps([{"question": "Who dredged the harbour of Quell 1?", "answer": "Osk 1"}])
                    if "question" in c[-1]["content"].lower() else "Rewritten, 1901." for c in conversations]

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    monkeypatch.setattr(ray_cluster, "RayEnginePool", Pool)
    corpus = tmp_path / "corpus.jsonl"
    save_corpus_jsonl(MORE[1:2], corpus)
    common = ["--work-dir", str(tmp_path / "w"), "--corpus", str(corpus), "--model", str(tiny_model_dir),
              "--executor", "ray", "--actors", "3"]
    assert main(["augment", *common]) == 0
    assert "augmented 1 documents" in capsys.readouterr().out
    assert (tmp_path / "w" / "augmented.jsonl").is_file() and len(built) == 1
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question": "Who dredged the harbour of Quell 1?", "answers": ["Osk 1"]}\n')
    assert main(["answer", *common, "--questions", str(questions), "--out", str(tmp_path / "a.jsonl"),
                 "--mode", "standard"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert len(built) == 2 and [r["answer"] for r in rows] == ["Osk 1"] and rows[0]["em"] == 1.0
