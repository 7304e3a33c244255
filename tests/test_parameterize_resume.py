"""Crash safety: `prag parameterize` killed with SIGKILL mid-run, then re-run.

No finished document is trained again (its files are untouched), no partial adapter is
ever visible, and the re-run completes the corpus.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from prag_vllm.adapters import META_FILE, WEIGHTS_FILE, AdapterStore, LoraAdapter, doc_key, sha256_file
from prag_vllm.corpus import Document, save_corpus_jsonl

N_DOCS = 120
REPO = Path(__file__).resolve().parents[1]


def _corpus(path: Path) -> list[Document]:
    words = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november".split()
    docs = [Document(f"doc-{i}", f"Title {i}", " ".join(words[(i * 7 + k) % len(words)] for k in range(8 + i % 40))
                     + f" The number is {i}.") for i in range(N_DOCS)]
    save_corpus_jsonl(docs, path)
    return docs


def _snapshot(docs_dir: Path) -> dict[str, tuple[str, int]]:
    """Visible adapter directories -> (sha256 of the tensors, mtime_ns)."""
    out = {}
    for p in docs_dir.iterdir():
        if not p.name.startswith("."):
            w = p / WEIGHTS_FILE
            out[p.name] = (sha256_file(w), w.stat().st_mtime_ns)
    return out


def test_kill_9_then_resume(tiny_model_dir, tmp_path):
    corpus, work = tmp_path / "corpus.jsonl", tmp_path / "work"
    docs = _corpus(corpus)
    cmd = [sys.executable, "-m", "prag_vllm.cli", "parameterize", "--work-dir", str(work), "--corpus", str(corpus),
           "--model", str(tiny_model_dir), "--no-augmentation", "--precision", "float32", "--slots", "4",
           "--epochs", "2"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    docs_dir = None
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            found = list(work.glob("adapters/*/*/docs")) if work.exists() else []
            # visible adapters only: pathlib's "*" also matches the hidden temporary directories
            if found and sum(1 for p in found[0].iterdir()
                             if not p.name.startswith(".") and (p / META_FILE).is_file()) >= 5:
                docs_dir = found[0]
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed: use more documents"
        assert docs_dir is not None, "no adapters appeared in time"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    # after the crash: every visible adapter is complete and loads (checksum verified); temporaries are hidden
    store = AdapterStore(docs_dir.parent)
    visible = _snapshot(docs_dir)
    assert 5 <= len(visible) < N_DOCS
    by_key = {doc_key(d.id): d.id for d in docs}
    for key in visible:  # only complete adapters, named by their document's key
        assert key in by_key and store.has(by_key[key])
        LoraAdapter.load(docs_dir / key)
    leftovers = [p.name for p in docs_dir.iterdir() if p.name.startswith(".")]
    assert all(name.endswith((".tmp", ".old")) for name in leftovers)  # a killed writer's hidden temporaries
    done_before = {d.id for d in docs if store.has(d.id)}
    assert {doc_key(i) for i in done_before} == set(visible)

    # re-run to the end: finished documents are skipped and their files untouched
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["skipped"] == len(done_before)
    assert summary["trained"] == N_DOCS - len(done_before)
    after = _snapshot(docs_dir)
    assert len(after) == N_DOCS and all(store.has(d.id) for d in docs)
    assert {k: after[k] for k in visible} == visible, "a finished document was rewritten"
    for d in docs:
        assert store.load(d.id).meta["doc_id"] == d.id
