"""Pick a retrieval backend by name: the embedded bm25s index (default) or Elasticsearch.

``build_retriever`` is what the CLI and the server call; ``add_retriever_arguments`` and
``retriever_from_args`` give every subcommand the same ``--retriever``/``--es-*`` flags.
Secrets can come from the environment instead of the command line (which other users
of the machine can see): ``PRAG_ES_API_KEY``, ``PRAG_ES_PASSWORD``.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from prag_vllm.corpus import Document
from prag_vllm.errors import InputError
from prag_vllm.retrieve.base import Retriever
from prag_vllm.retrieve.elasticsearch import ANALYZERS, ElasticsearchConfig

logger = logging.getLogger(__name__)

BACKENDS = ("bm25", "elasticsearch")


@dataclass
class RetrieverConfig:
    """Which backend answers queries, and where its index lives."""

    kind: str = "bm25"
    """``bm25`` (embedded bm25s index on disk) or ``elasticsearch``."""
    index_dir: str | None = None
    """Directory of the embedded index (``bm25`` only)."""
    es: ElasticsearchConfig | None = field(default=None)
    """Cluster, index, auth and TLS settings (``elasticsearch`` only)."""


def build_retriever(kind: str | RetrieverConfig, docs: list[Document] | None, *,
                    index_dir: str | os.PathLike | None = None, es: ElasticsearchConfig | None = None,
                    update_index: bool = True) -> Retriever:
    """The retriever of backend ``kind`` over ``docs``.

    The embedded index is a local cache: with ``docs`` it is built, or reused when it holds
    exactly ``docs`` (a corpus fingerprint); with ``docs=None`` it is loaded as it is.
    An Elasticsearch index is shared, so it is written only with ``update_index`` and
    ``docs`` (incrementally); otherwise the existing index is opened and checked, and a
    warning is logged if it holds another corpus than ``docs``.
    """
    if isinstance(kind, RetrieverConfig):
        kind, index_dir, es = kind.kind, kind.index_dir if index_dir is None else index_dir, es or kind.es
    if kind == "bm25":
        from prag_vllm.retrieve.bm25 import BM25Retriever

        if index_dir is None:
            raise InputError("the bm25 retriever needs an index directory")
        return BM25Retriever.load(index_dir) if docs is None else BM25Retriever.build_or_load(docs, index_dir)
    if kind == "elasticsearch":
        from prag_vllm.retrieve.elasticsearch import ElasticsearchRetriever

        es = es or ElasticsearchConfig()
        if update_index and docs is not None:
            return ElasticsearchRetriever.build_or_load(docs, es)
        return ElasticsearchRetriever.open(es, docs)
    raise InputError(f"unknown retriever {kind!r} (choose from {', '.join(BACKENDS)})")


# -- command line --------------------------------------------------------------------------
def add_retriever_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("retrieval backend")
    g.add_argument("--retriever", choices=BACKENDS, default="bm25",
                   help="bm25: embedded index in the work dir (default); elasticsearch: an ES cluster")
    g.add_argument("--es-url", default=os.environ.get("PRAG_ES_URL", ElasticsearchConfig.url),
                   help="Elasticsearch URL (default $PRAG_ES_URL or %(default)s)")
    g.add_argument("--es-index", default=ElasticsearchConfig.index, help="index name (default %(default)s)")
    g.add_argument("--es-api-key", default=None, help="API key (default $PRAG_ES_API_KEY)")
    g.add_argument("--es-user", default=None, help="user for basic auth (password: --es-password or $PRAG_ES_PASSWORD)")
    g.add_argument("--es-password", default=None,
                   help="basic-auth password (prefer $PRAG_ES_PASSWORD: command lines are visible to others)")
    g.add_argument("--es-ca-certs", default=None, help="PEM CA bundle for an https cluster")
    g.add_argument("--es-no-verify-certs", action="store_true", help="do not verify the TLS certificate (tests only)")
    g.add_argument("--es-timeout", type=float, default=ElasticsearchConfig.request_timeout, help="seconds per request")
    g.add_argument("--es-analyzer", choices=ANALYZERS, default=ElasticsearchConfig.analyzer,
                   help="prag_english (same analysis as bm25; default) or the built-in english")


def es_config_from_args(args: argparse.Namespace) -> ElasticsearchConfig:
    api_key = args.es_api_key or os.environ.get("PRAG_ES_API_KEY") or None
    basic_auth = None
    if args.es_user:
        password = args.es_password if args.es_password is not None else os.environ.get("PRAG_ES_PASSWORD")
        if password is None:
            raise InputError("--es-user needs a password: --es-password or $PRAG_ES_PASSWORD")
        basic_auth = (args.es_user, password)
    return ElasticsearchConfig(url=args.es_url, index=args.es_index, api_key=api_key, basic_auth=basic_auth,
                               ca_certs=args.es_ca_certs, verify_certs=not args.es_no_verify_certs,
                               request_timeout=args.es_timeout, analyzer=args.es_analyzer)


def retriever_config_from_args(args: argparse.Namespace, index_dir: str | os.PathLike) -> RetrieverConfig:
    if args.retriever == "elasticsearch":
        if not getattr(args, "verbose", False):  # the client logs every request and retry with a traceback
            logging.getLogger("elastic_transport").setLevel(logging.ERROR)
        return RetrieverConfig(kind="elasticsearch", es=es_config_from_args(args))
    return RetrieverConfig(kind=args.retriever, index_dir=str(Path(index_dir)))


def retriever_from_args(args: argparse.Namespace, docs: list[Document] | None, index_dir: str | os.PathLike,
                        update_index: bool = False) -> Retriever:
    """The retriever the ``--retriever``/``--es-*`` flags ask for (see :func:`build_retriever`)."""
    return build_retriever(retriever_config_from_args(args, index_dir), docs, update_index=update_index)


def describe(cfg: RetrieverConfig) -> str:
    """Where the index lives, for messages."""
    return f"Elasticsearch {cfg.es.where}" if cfg.kind == "elasticsearch" and cfg.es else str(cfg.index_dir)
