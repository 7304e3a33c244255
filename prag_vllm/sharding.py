"""Split a corpus between N independent workers without any coordination.

A document belongs to shard ``hash(id) mod N`` (sha256 of the id; stable across runs,
machines and corpus order), so N processes given ``--shard 0/N`` ... ``--shard N-1/N``
cover every document exactly once. Their outputs merge by copying: adapters live in
per-document directories named by a hash of the id, and augmentation logs are JSON Lines
keyed by id.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

from prag_vllm.errors import InputError

logger = logging.getLogger(__name__)
T = TypeVar("T")


def shard_of(doc_id: str, count: int) -> int:
    """The shard (0 .. count-1) that owns ``doc_id``."""
    digest = hashlib.sha256(b"prag-shard\x00" + doc_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (``0/1`` is the whole corpus)."""

    index: int = 0
    """This worker's shard, 0-based."""
    count: int = 1
    """How many shards the corpus is split into."""

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise InputError(f"bad shard {self.index}/{self.count}: need 0 <= i < N")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"i/N"`` -> ``Shard(i, N)``."""
        try:
            i, n = (int(part) for part in text.split("/"))
        except ValueError:
            raise InputError(f"--shard expects i/N (e.g. 0/4), got {text!r}") from None
        return cls(i, n)

    @property
    def whole(self) -> bool:
        return self.count == 1

    def owns(self, doc_id: str) -> bool:
        return self.whole or shard_of(doc_id, self.count) == self.index

    def select(self, items: Iterable[T], key=lambda item: item.id) -> list[T]:
        """The items whose ``key`` (default: ``.id``) this shard owns, in their order."""
        return [x for x in items if self.owns(key(x))]

    @property
    def tag(self) -> str:
        """File-name tag, e.g. ``shard-2-of-8``."""
        return f"shard-{self.index}-of-{self.count}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"
