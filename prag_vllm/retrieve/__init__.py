"""Retrieve: backends registered by name (embedded BM25 is the default)."""

from __future__ import annotations

from prag_vllm.retrieve.base import DEFAULT_TOP_K, MAX_TOP_K, Hit, Retriever, check_top_k
from prag_vllm.retrieve.bm25 import BM25Retriever
from prag_vllm.retrieve.elasticsearch import ElasticsearchConfig, ElasticsearchRetriever
from prag_vllm.retrieve.factory import RetrieverConfig, build_retriever

RETRIEVERS: dict[str, type[Retriever]] = {"bm25": BM25Retriever, "elasticsearch": ElasticsearchRetriever}

__all__ = ["BM25Retriever", "DEFAULT_TOP_K", "ElasticsearchConfig", "ElasticsearchRetriever", "Hit", "MAX_TOP_K",
           "RETRIEVERS", "Retriever", "RetrieverConfig", "build_retriever", "check_top_k"]
