"""Generic questions: JSON Lines (or a JSON list) of ``question``, ``answers`` (or
``answer``), optional ``id`` and ``type`` -- the format of ``prag answer --questions``."""

from __future__ import annotations

from pathlib import Path

from prag_vllm.datasets.base import Dataset, check_unique, read_json_list
from prag_vllm.fileio import read_jsonl
from prag_vllm.pipeline import questions_from_rows

NAME = "jsonl"
SUBTYPES: tuple[str, ...] = ()


def sniff(kind: str, records: list[dict]) -> bool:
    return kind in ("jsonl", "json") and "question" in records[0]


def load(path: Path) -> Dataset:
    with open(path, encoding="utf-8") as fh:
        is_list = fh.read(4096).lstrip().startswith("[")
    rows = read_json_list(path, "") if is_list else read_jsonl(path)
    return Dataset(NAME, path, check_unique(questions_from_rows(rows, str(path)), path), None, SUBTYPES)
