"""2WikiMultihopQA, dev JSON (``dev.json``).

Records: ``_id, type (comparison / inference / compositional / bridge_comparison),
question, answer, context, supporting_facts, evidences`` (and ``entity_ids``).
"""

from __future__ import annotations

from pathlib import Path

from prag_vllm.datasets.base import Dataset
from prag_vllm.datasets.multihop import load_multihop

NAME = "2wikimultihopqa"
SUBTYPES = ("comparison", "bridge_comparison", "inference", "compositional")
_OWN_TYPES = {"inference", "compositional", "bridge_comparison"}


def sniff(kind: str, records: list[dict]) -> bool:
    first = records[0]
    if kind != "json" or "context" not in first:
        return False
    return "evidences" in first or "entity_ids" in first or any(r.get("type") in _OWN_TYPES for r in records)


def load(path: Path) -> Dataset:
    return load_multihop(path, NAME, SUBTYPES)
