"""The retriever interface every backend implements (embedded BM25, Elasticsearch, ...)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from prag_vllm.corpus import Document
from prag_vllm.errors import InputError

DEFAULT_TOP_K = 3
MAX_TOP_K = 64


@dataclass(frozen=True)
class Hit:
    """One retrieved document with its BM25 score."""

    doc: Document
    """The document."""
    score: float
    """Backend score (higher is better); comparable within one query only."""


def check_top_k(k: object) -> int:
    """Validate a user-supplied top-k at the boundary."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise InputError(f"top-k must be an integer, got {k!r}")
    if not 1 <= k <= MAX_TOP_K:
        raise InputError(f"top-k must be between 1 and {MAX_TOP_K}, got {k}")
    return k


class Retriever(ABC):
    """Retrieve: BM25 top-k documents for each query."""

    @abstractmethod
    def retrieve(self, queries: list[str], k: int = DEFAULT_TOP_K) -> list[list[Hit]]:
        """Return, for each query, up to ``k`` hits, best first."""

    @abstractmethod
    def get(self, doc_id: str) -> Document | None:
        """The document with this id, or None."""

    @abstractmethod
    def __len__(self) -> int:
        """Number of indexed documents."""
