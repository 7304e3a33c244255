"""Retrieve: backends registered by name (embedded BM25 is the default)."""

from __future__ import annotations

from prag_vllm.retrieve.base import DEFAULT_TOP_K, MAX_TOP_K, Hit, Retriever, check_top_k
from prag_vllm.retrieve.bm25 import BM25Retriever

RETRIEVERS: dict[str, type[Retriever]] = {"bm25": BM25Retriever}

__all__ = ["BM25Retriever", "DEFAULT_TOP_K", "Hit", "MAX_TOP_K", "RETRIEVERS", "Retriever", "check_top_k"]
