"""BM25 retrieval on an Elasticsearch cluster, behind the same interface as the embedded index.

One index holds the corpus: ``id`` (keyword), ``title`` and ``text`` (text, English
analyzer) and ``fp`` (a per-document hash used for incremental re-indexing). A query is a
``multi_match`` of type ``best_fields`` over ``title`` and ``text``: a document scores its
better field's BM25 (Elasticsearch's defaults, k1 = 1.2, b = 0.75).

The default analyzer ``prag_english`` is the built-in ``english`` analyzer's chain
(standard tokenizer, possessive stemmer, lower-case, English stop words) with the Snowball
English stemmer and a minimum token length of 2, so that it analyzes text like the
embedded bm25s backend (``bm25.py``). ``analyzer="english"`` uses the built-in one
(Porter stemmer) instead.

The official ``elasticsearch`` client is imported on first use (``pip install
'prag-vllm[es]'``); every client or server failure becomes a one-line
:class:`~prag_vllm.errors.RetrievalError` naming the URL and the index.
"""

from __future__ import annotations

import hashlib
import json
import logging

from prag_vllm.corpus import Document
from prag_vllm.errors import InputError, RetrievalError
from prag_vllm.retrieve.base import DEFAULT_TOP_K, Hit, Retriever, check_top_k
from prag_vllm.retrieve.bm25 import corpus_fingerprint
from prag_vllm.retrieve.es_config import ANALYZERS, ElasticsearchConfig, es_errors, one_line

logger = logging.getLogger(__name__)

__all__ = ["ANALYZERS", "ElasticsearchConfig", "ElasticsearchRetriever", "es_doc_id"]

INDEX_FORMAT = 1
MAX_ES_ID_BYTES = 512
_ANALYSIS = {
    "filter": {
        "prag_possessive": {"type": "stemmer", "language": "possessive_english"},
        "prag_stop": {"type": "stop", "stopwords": "_english_"},
        "prag_snowball": {"type": "snowball", "language": "English"},
        "prag_min_length": {"type": "length", "min": 2},
    },
    "analyzer": {
        "prag_english": {
            "type": "custom",
            "tokenizer": "standard",
            "filter": ["prag_possessive", "lowercase", "prag_stop", "prag_snowball", "prag_min_length"],
        }
    },
}


def es_doc_id(doc_id: str) -> str:
    """The Elasticsearch ``_id`` of a document: its id, or a hash when over 512 bytes."""
    if len(doc_id.encode("utf-8")) <= MAX_ES_ID_BYTES:
        return doc_id
    return "sha256:" + hashlib.sha256(doc_id.encode("utf-8")).hexdigest()


def doc_fingerprint(doc: Document) -> str:
    return hashlib.sha256(json.dumps([doc.id, doc.title, doc.text]).encode()).hexdigest()[:32]


class ElasticsearchRetriever(Retriever):
    """BM25 top-k from an Elasticsearch index holding the corpus."""

    def __init__(self, config: ElasticsearchConfig, client=None, check: bool = True):
        """Connect to an existing index; ``check`` verifies that it exists and its mapping fits."""
        self.config = config
        self.client = client if client is not None else config.make_client()
        self._docs: dict[str, Document] = {}
        if check:
            self.check_index()

    # -- index management -----------------------------------------------------------------
    @staticmethod
    def _meta(fingerprint: str | None) -> dict:
        """The mapping's ``_meta``: the fingerprint of the corpus the index holds, once complete."""
        return {"prag_index_format": INDEX_FORMAT, "fingerprint": fingerprint}

    def index_body(self, fingerprint: str | None = None) -> dict:
        cfg = self.config
        settings: dict = {"number_of_shards": cfg.shards}
        if cfg.replicas is not None:
            settings["number_of_replicas"] = cfg.replicas
        if cfg.analyzer == "prag_english":
            settings["analysis"] = _ANALYSIS
        text = {"type": "text", "analyzer": cfg.analyzer}
        return {
            "settings": settings,
            "mappings": {
                "_meta": self._meta(fingerprint),
                "properties": {"id": {"type": "keyword"}, "title": dict(text), "text": dict(text),
                               "fp": {"type": "keyword"}},
            },
        }

    def _mapping(self) -> dict | None:
        """The index mapping, or None when the credentials may not read it (403)."""
        import elasticsearch

        with es_errors(self.config, "read the mapping of"):
            try:
                resp = self.client.indices.get_mapping(index=self.config.index)
            except elasticsearch.AuthorizationException:
                logger.warning("may not read the mapping of %s; assuming it fits", self.config.where)
                return None
        return next(iter(resp.body.values()), {}).get("mappings", {}) if resp.body else {}

    def check_index(self) -> dict | None:
        """Raise :class:`RetrievalError` unless the index exists with the expected fields/analyzer."""
        mapping = self._mapping()
        if mapping is None:
            return None
        props = mapping.get("properties", {})
        problems = []
        if props.get("id", {}).get("type") != "keyword":
            problems.append("no keyword field 'id'")
        for name in ("title", "text"):
            f = props.get(name, {})
            if f.get("type") != "text":
                problems.append(f"no text field {name!r}")
            elif f.get("analyzer", "standard") != self.config.analyzer:
                problems.append(f"{name!r} uses analyzer {f.get('analyzer', 'standard')!r}, not {self.config.analyzer!r}")
        if problems:
            raise RetrievalError(f"Elasticsearch {self.config.where} does not fit this retriever: "
                                 f"{'; '.join(problems)} (use another --es-index, or delete it to rebuild)")
        return mapping

    def _exists(self) -> bool:
        with es_errors(self.config, "look up"):
            return bool(self.client.indices.exists(index=self.config.index))

    def _existing_fingerprints(self) -> dict[str, str]:
        """``_id -> fp`` of every document already in the index (one scroll over ids)."""
        from elasticsearch import helpers

        out: dict[str, str] = {}
        with es_errors(self.config, "scan"):
            self.client.indices.refresh(index=self.config.index)  # see what an interrupted run sent
            for hit in helpers.scan(self.client, index=self.config.index, query={"query": {"match_all": {}}},
                                    _source=["fp"], size=max(self.config.bulk_batch_size, 1000)):
                out[hit["_id"]] = (hit.get("_source") or {}).get("fp", "")
        return out

    def index_corpus(self, docs: list[Document]) -> dict:
        """Create the index if needed and make it hold exactly ``docs``.

        Incremental and resumable: documents already indexed with the same content are
        skipped, changed ones are re-sent, ones no longer in the corpus are deleted, and
        the corpus fingerprint is written last (an interrupted run is simply re-run).
        """
        if not docs:
            raise InputError("cannot build an Elasticsearch index over an empty corpus")
        from elasticsearch import helpers
        from tqdm.auto import tqdm

        cfg, fingerprint = self.config, corpus_fingerprint(docs)
        if not self._exists():
            body = self.index_body(fingerprint=None)
            with es_errors(cfg, "create"):
                self.client.indices.create(index=cfg.index, settings=body["settings"], mappings=body["mappings"])
            logger.info("created Elasticsearch %s (analyzer %s)", cfg.where, cfg.analyzer)
            existing: dict[str, str] = {}
        else:
            mapping = self.check_index() or {}
            if (mapping.get("_meta") or {}).get("fingerprint") == fingerprint:
                logger.info("Elasticsearch %s already holds this corpus", cfg.where)
                self._docs = {d.id: d for d in docs}
                return {"indexed": 0, "deleted": 0, "unchanged": len(docs)}
            existing = self._existing_fingerprints()
            with es_errors(cfg, "update the mapping of"):  # until done, the index holds no known corpus
                self.client.indices.put_mapping(index=cfg.index, meta=self._meta(None))
        self._docs = {}
        wanted = {es_doc_id(d.id): d for d in docs}
        todo = [d for i, d in wanted.items() if existing.get(i) != doc_fingerprint(d)]
        stale = [i for i in existing if i not in wanted]
        actions = [{"_op_type": "index", "_index": cfg.index, "_id": es_doc_id(d.id),
                    "_source": {"id": d.id, "title": d.title, "text": d.text, "fp": doc_fingerprint(d)}} for d in todo]
        actions += [{"_op_type": "delete", "_index": cfg.index, "_id": i} for i in stale]
        failures: list[dict] = []
        with es_errors(cfg, "bulk-index into"), tqdm(total=len(actions), desc="indexing", unit="doc",
                                                      disable=len(actions) < 1000) as bar:
            for ok, item in helpers.streaming_bulk(self.client, actions, chunk_size=cfg.bulk_batch_size,
                                                   max_retries=cfg.max_retries, initial_backoff=1, max_backoff=30,
                                                   raise_on_error=False, raise_on_exception=True):
                if not ok and not (item.get("delete", {}).get("status") == 404):
                    failures.append(item)
                bar.update(1)
        if failures:
            first = next(iter(failures[0].values()))
            raise RetrievalError(f"Elasticsearch rejected {len(failures)} documents in {cfg.where}; first: "
                                 f"{first.get('_id')!r}: {one_line(first.get('error'), 200)}")
        with es_errors(cfg, "refresh"):
            self.client.indices.refresh(index=cfg.index)
            self.client.indices.put_mapping(index=cfg.index, meta=self._meta(fingerprint))
        self._docs = {d.id: d for d in docs}
        logger.info("Elasticsearch %s: %d documents indexed, %d deleted, %d unchanged",
                    cfg.where, len(todo), len(stale), len(docs) - len(todo))
        return {"indexed": len(todo), "deleted": len(stale), "unchanged": len(docs) - len(todo)}

    @classmethod
    def build_or_load(cls, docs: list[Document], config: ElasticsearchConfig, client=None) -> ElasticsearchRetriever:
        """Like :meth:`BM25Retriever.build_or_load`: (re)index only if the index does not hold ``docs``."""
        retriever = cls(config, client=client, check=False)
        retriever.index_corpus(docs)
        return retriever

    @classmethod
    def open(cls, config: ElasticsearchConfig, docs: list[Document] | None = None, client=None) -> ElasticsearchRetriever:
        """Use an existing index without writing to it; warn if it does not hold ``docs``."""
        retriever = cls(config, client=client, check=False)
        mapping = retriever.check_index()
        if docs is not None and mapping is not None:
            if (mapping.get("_meta") or {}).get("fingerprint") == corpus_fingerprint(docs):
                retriever._docs = {d.id: d for d in docs}
            else:
                logger.warning("Elasticsearch %s does not hold exactly this corpus (run `prag index --retriever "
                               "elasticsearch` to update it); retrieved documents come from the index", config.where)
        return retriever

    # -- Retriever ------------------------------------------------------------------------
    def __len__(self) -> int:
        with es_errors(self.config, "count"):
            return int(self.client.count(index=self.config.index)["count"])

    def get(self, doc_id: str) -> Document | None:
        if doc_id in self._docs:  # the corpus this index was checked to hold
            return self._docs[doc_id]
        import elasticsearch

        with es_errors(self.config, "get a document from"):
            try:
                src = self.client.get(index=self.config.index, id=es_doc_id(doc_id))["_source"]
            except elasticsearch.NotFoundError as exc:
                if "index_not_found" in str(exc.error):
                    raise
                return None
        return self._document(src)

    @staticmethod
    def _document(src: dict) -> Document:
        """The document as the index holds it (the index is authoritative, never a cache)."""
        return Document(id=str(src["id"]), title=src.get("title") or "", text=src["text"])

    def query_body(self, query: str, k: int) -> dict:
        return {"query": {"multi_match": {"query": query, "type": "best_fields", "fields": ["title", "text"]}},
                "size": k, "_source": ["id", "title", "text"], "track_total_hits": False}

    def retrieve(self, queries: list[str], k: int = DEFAULT_TOP_K) -> list[list[Hit]]:
        check_top_k(k)
        queries = list(queries)
        if not queries:
            return []
        responses: list[dict] = []
        step = self.config.search_batch_size
        for start in range(0, len(queries), step):
            searches: list[dict] = []
            for q in queries[start: start + step]:
                searches += [{"index": self.config.index}, self.query_body(q, k)]
            with es_errors(self.config, "search"):
                responses += self.client.msearch(searches=searches)["responses"]
        out: list[list[Hit]] = []
        for resp in responses:
            if "error" in resp:
                err = resp["error"]
                kind = err.get("type", "") if isinstance(err, dict) else ""
                if kind == "index_not_found_exception":
                    raise RetrievalError(f"Elasticsearch index {self.config.index!r} not found at {self.config.url} "
                                         f"(run `prag index --retriever elasticsearch` first)")
                reason = err.get("reason", err) if isinstance(err, dict) else err
                raise RetrievalError(f"Elasticsearch search failed on {self.config.where}: {kind} {one_line(reason, 200)}")
            out.append([Hit(self._document(h["_source"]), float(h["_score"])) for h in resp["hits"]["hits"]])
        return out
