"""The real server process on loopback, shared by the server tests (one per test session).

Its corpus: 20 invented documents, 16 with a random adapter (``NO_ADAPTER`` have none), plus
two whose adapters are unusable (``BAD_ADAPTERS``: a flipped byte, another base model) and
two (``SWAP_DOC``, ``EVICT_DOC``) whose adapters tests replace while the server runs. vLLM's
worker keeps 1 MiB of document adapters (about one here), so it reads files often.
With ``PRAG_AUDIT_FILES`` set, the server logs every file it opens (Python audit hook).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from conftest import random_adapter

API_KEY = "sk-prag-test"
WORDS = ["Velmora", "Tarnholm", "Quorra", "Orvanne", "Brask", "Solbakk", "Ostrevik", "Sevlin", "Halloway", "Kestrune",
         "Mirrowen", "Dalvik", "Pennory", "Zandrel", "Uskor", "Fennick", "Graymoor", "Ilvane", "Jorsted", "Lumeria"]
NO_ADAPTER = {f"doc{i}" for i in range(len(WORDS)) if i % 5 == 4}
MODES = ["closed-book", "standard", "da-rag", "parametric", "combined"]
BAD_ADAPTERS = {"bad-bytes": "Corruptia", "bad-model": "Wrongmodelia"}
SWAP_DOC = ("doc-swap", "Rewoldia")
"""A document with a good adapter that only test_replaced_adapter_while_serving asks about."""
EVICT_DOC = ("doc-evict", "Quillmarsh")
"""The same for test_adapter_replaced_after_vllm_dropped_it."""
SERVER_DTYPE = os.environ.get("PRAG_TEST_SERVER_DTYPE", "float32")
"""The server's engine dtype: float32 (exact comparisons, CI); ``auto`` runs the soak in the
production dtype (``bench/batch_invariance.py soak``)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server(tmp_path_factory, test_model_dir):
    """A real server process (see the module docstring)."""
    from prag_vllm.adapters import AdapterStore

    root = tmp_path_factory.mktemp("server")
    docs = [{"id": f"doc{i}", "title": w,
             "text": f"{w} is a fictional town known for its {w.lower()} festival, held every spring since {1900 + 3 * i}."}
            for i, w in enumerate(WORDS)]
    store = AdapterStore(root / "store")
    for i, d in enumerate(docs):
        if d["id"] not in NO_ADAPTER:
            store.save(d["id"], random_adapter(test_model_dir, seed=i, std=0.05))
    for j, (doc_id, title) in enumerate(BAD_ADAPTERS.items()):
        docs.append({"id": doc_id, "title": title, "text": f"{title} is a fictional harbour with a lighthouse."})
        store.save(doc_id, random_adapter(test_model_dir, seed=100 + j, std=0.05))
    docs.append({"id": SWAP_DOC[0], "title": SWAP_DOC[1],
                 "text": "Rewoldia foundries cast copper bells."})  # no word another test asks about
    store.save(SWAP_DOC[0], random_adapter(test_model_dir, seed=200, std=0.05))
    docs.append({"id": EVICT_DOC[0], "title": EVICT_DOC[1], "text": "Quillmarsh kilns fire blue tiles."})
    store.save(EVICT_DOC[0], random_adapter(test_model_dir, seed=202, std=0.05))
    weights = store.path("bad-bytes") / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    meta_path = store.path("bad-model") / "prag_meta.json"
    meta_path.write_text(json.dumps(dict(json.loads(meta_path.read_text()), base_model_id="f" * 32)))
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    port = _free_port()
    log = open(root / "server.log", "w")
    cmd = [sys.executable, "-m", "serving", "--corpus", str(corpus), "--work-dir", str(root / "ws"),
           "--adapter-store", str(store.root), "--model", str(test_model_dir), "--dtype", SERVER_DTYPE,
           "--port", str(port), "--max-model-len", "1024", "--max-loras", "8", "--max-num-seqs", "32",
           "--max-top-k", "8", "--api-key", API_KEY, "--cache-max-entries", "32", "--log-level", "info",
           "--preload-adapters", "1"]
    audit = root / "files.log"
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1", PRAG_AUDIT_FILES=str(audit),
                                     PRAG_WORKER_ADAPTER_CACHE_MB="2"))
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 900  # first start compiles the model (torch.compile), minutes on a busy 2-core machine
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{(root / 'server.log').read_text()[-3000:]}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    else:
        proc.kill()
        raise RuntimeError("server did not become healthy in 900 s")
    yield {"base": base, "store": store, "docs": {d["id"]: d for d in docs}, "log": root / "server.log",
           "audit": audit, "root": root, "pid": proc.pid, "model_dir": test_model_dir}
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()
