"""Sharding: stable, disjoint, covering assignment; sharded augmentation logs merge."""

import contextlib
import json

import pytest

from conftest import DOCS
from prag_vllm.sharding import Shard, shard_of


def test_sharding_disjoint_covering_stable():
    ids = [f"doc-{i}" for i in range(2000)] + ["Ünïcode title", "a/b", "x#2"]
    for n in (1, 2, 3, 8):
        parts = [Shard(i, n).select(ids, key=str) for i in range(n)]
        assert sorted(x for p in parts for x in p) == sorted(ids)  # covering, and disjoint (no duplicates)
        assert all(len(p) > len(ids) / n * 0.8 for p in parts)  # balanced
        rev = [Shard(i, n).select(list(reversed(ids)), key=str) for i in range(n)]
        assert [set(p) for p in parts] == [set(p) for p in rev]  # independent of corpus order
    # stable across runs and machines: fixed values of the id hash
    assert [shard_of(f"doc-{i}", 4) for i in range(8)] == [2, 0, 2, 2, 1, 1, 2, 1]
    assert Shard.parse("2/8") == Shard(2, 8) and str(Shard(2, 8)) == "2/8" and Shard(2, 8).tag == "shard-2-of-8"
    from prag_vllm.errors import InputError
    for bad in ["3/2", "-1/2", "1", "a/b", "0/0"]:
        with pytest.raises(InputError):
            Shard.parse(bad)


def test_sharded_augment_logs_merge(tmp_path):
    from prag_vllm.cli import build_parser
    from prag_vllm.corpus import save_corpus_jsonl
    from prag_vllm.offline_commands import load_workspace_augmentations, run_augment
    from prag_vllm.workspace import Workspace

    class Fake:
        def chat(self, conversations, *, max_tokens, temperature=0.0, seed=None):
            # a usable pair (augment.usable_qa): the question names the subject (the passage's first
            # word, its title's), the answer is the passage's last word
            passages = [c[-1]["content"].split("Passage:\n")[1].split() for c in conversations]
            return ["Rewritten." if c[-1]["content"].startswith("Rewrite") else
                    json.dumps([{"question": f"Where is {w[0]}?", "answer": w[-1]}])
                    for c, w in zip(conversations, passages)]

    corpus = tmp_path / "corpus.jsonl"
    save_corpus_jsonl(DOCS, corpus)
    ws = Workspace.at(tmp_path / "w")
    seen = []
    for i in range(2):
        args = build_parser().parse_args(["augment", "--work-dir", str(ws.root), "--corpus", str(corpus),
                                          "--shard", f"{i}/2"])
        args.ws = ws
        assert run_augment(args, lambda: contextlib.nullcontext(Fake())) == 0
        log = ws.root / f"augmented.shard-{i}-of-2.jsonl"
        ids = [json.loads(line)["id"] for line in log.read_text().splitlines()]
        assert ids == [d.id for d in DOCS if shard_of(d.id, 2) == i]
        seen += ids
    assert sorted(seen) == sorted(d.id for d in DOCS) and not ws.augmented.exists()
    merged = load_workspace_augmentations(ws)
    assert set(merged) == {d.id for d in DOCS} and all(a.qa for a in merged.values())
