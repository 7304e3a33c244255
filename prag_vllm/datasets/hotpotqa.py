"""HotpotQA, dev distractor JSON (``hotpot_dev_distractor_v1.json``).

Records: ``_id, question, answer, type (bridge / comparison), level, supporting_facts,
context`` (10 paragraphs per question: 2 gold + 8 distractors).
"""

from __future__ import annotations

from pathlib import Path

from prag_vllm.datasets.base import Dataset
from prag_vllm.datasets.multihop import load_multihop

NAME = "hotpotqa"
SUBTYPES = ("bridge", "comparison")


def sniff(kind: str, records: list[dict]) -> bool:
    first = records[0]
    return kind == "json" and "context" in first and "question" in first and "answer" in first


def load(path: Path) -> Dataset:
    return load_multihop(path, NAME, SUBTYPES)
