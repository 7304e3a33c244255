"""Embedded BM25 retriever on bm25s with Lucene scoring, saved to and loaded from disk.

The analyzer mirrors Elasticsearch's ``english`` analyzer as closely as bm25s allows:
lower-casing, English stop words, and Snowball English stemming (PyStemmer). Scoring
is ``method="lucene"`` with Lucene's defaults k1 = 1.2, b = 0.75.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from prag_vllm.corpus import Document, load_jsonl_corpus, save_corpus_jsonl
from prag_vllm.errors import InputError
from prag_vllm.fileio import atomic_directory, atomic_write_json
from prag_vllm.retrieve.base import DEFAULT_TOP_K, Hit, Retriever, check_top_k

logger = logging.getLogger(__name__)

INDEX_FORMAT = 1
K1 = 1.2
B = 0.75


def corpus_fingerprint(docs: list[Document]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(json.dumps([d.id, d.title, d.text]).encode())
    return h.hexdigest()


def _analyze(texts: list[str]) -> list[list[str]]:
    import bm25s
    import Stemmer

    stemmer = Stemmer.Stemmer("english")
    return bm25s.tokenize(
        texts, lower=True, stopwords="en", stemmer=stemmer, return_ids=False, show_progress=False
    )


class BM25Retriever(Retriever):
    """bm25s index over a list of documents."""

    def __init__(self, docs: list[Document], model: object | None = None):
        if not docs:
            raise InputError("cannot build a BM25 index over an empty corpus")
        import bm25s

        self.docs = docs
        self._by_id = {d.id: d for d in docs}
        if model is None:
            model = bm25s.BM25(method="lucene", k1=K1, b=B)
            model.index(_analyze([d.passage for d in docs]), show_progress=len(docs) > 5000)
        self._model = model

    def __len__(self) -> int:
        return len(self.docs)

    def get(self, doc_id: str) -> Document | None:
        return self._by_id.get(doc_id)

    def retrieve(self, queries: list[str], k: int = DEFAULT_TOP_K) -> list[list[Hit]]:
        check_top_k(k)
        k_eff = min(k, len(self.docs))
        out: list[list[Hit]] = []
        for tokens in _analyze(list(queries)):
            if not tokens:
                out.append([])
                continue
            idx, scores = self._model.retrieve([tokens], k=k_eff, show_progress=False, n_threads=1)
            out.append([Hit(self.docs[int(i)], float(s)) for i, s in zip(idx[0], scores[0]) if s > 0])
        return out

    # -- persistence -------------------------------------------------------------------
    def save(self, index_dir: str | os.PathLike) -> None:
        """Write the index and its corpus to ``index_dir`` atomically."""
        with atomic_directory(index_dir) as tmp:
            self._model.save(str(tmp / "bm25"))
            save_corpus_jsonl(self.docs, tmp / "corpus.jsonl")
            atomic_write_json(
                tmp / "index.json",
                {"format": INDEX_FORMAT, "backend": "bm25s", "method": "lucene", "k1": K1, "b": B,
                 "documents": len(self.docs), "fingerprint": corpus_fingerprint(self.docs)},
            )
        logger.info("saved BM25 index of %d documents to %s", len(self.docs), index_dir)

    @classmethod
    def load(cls, index_dir: str | os.PathLike) -> BM25Retriever:
        import bm25s

        index_dir = Path(index_dir)
        meta_path = index_dir / "index.json"
        if not meta_path.is_file():
            raise InputError(f"no BM25 index at {index_dir} (run `prag index` first)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != INDEX_FORMAT:
            raise InputError(f"{index_dir}: index format {meta.get('format')} is not {INDEX_FORMAT}; rebuild it")
        docs = load_jsonl_corpus(index_dir / "corpus.jsonl")
        model = bm25s.BM25.load(str(index_dir / "bm25"))
        return cls(docs, model=model)

    @classmethod
    def build_or_load(cls, docs: list[Document], index_dir: str | os.PathLike) -> BM25Retriever:
        """Reuse the index in ``index_dir`` if it was built from exactly ``docs``, else rebuild it."""
        index_dir = Path(index_dir)
        meta_path = index_dir / "index.json"
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            if meta.get("fingerprint") == corpus_fingerprint(docs) and meta.get("format") == INDEX_FORMAT:
                return cls.load(index_dir)
            logger.info("corpus changed since %s was built; rebuilding", index_dir)
        retriever = cls(docs)
        retriever.save(index_dir)
        return retriever
