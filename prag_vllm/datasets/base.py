"""What every dataset loader returns, and the helpers they share."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from prag_vllm.corpus import Document
from prag_vllm.errors import InputError
from prag_vllm.pipeline import Question

logger = logging.getLogger(__name__)


@dataclass
class Dataset:
    """Questions of one QA file, and the passages it carries (if any)."""

    name: str
    """Format name (a key of :data:`prag_vllm.datasets.FORMATS`)."""
    path: Path
    """The file it was read from."""
    questions: list[Question]
    """Questions in file order, with gold answers (aliases) and sub-type."""
    documents: list[Document] | None = None
    """Closed retrieval corpus pooled from the file's own passages; None when it has none."""
    subtypes: tuple[str, ...] = ()
    """The format's known sub-types, in the paper's column order (others follow in file order)."""


def read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None


def read_json_list(path: Path, what: str) -> list[dict]:
    data = read_json(path)
    if not isinstance(data, list) or not data:
        raise InputError(f"{path}: expected a non-empty JSON list of {what} questions")
    for n, item in enumerate(data):
        if not isinstance(item, dict):
            raise InputError(f"{path}: item {n} is not a JSON object")
    return data


def text_field(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{where}: no '{key}'")
    return value.strip()


def alias_list(value: object, where: str) -> list[str]:
    """Gold answers as a list of non-empty strings; a JSON-encoded list string is decoded."""
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise InputError(f"{where}: answers {value[:60]!r} are not a valid JSON list") from None
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list):
        raise InputError(f"{where}: answers must be a string or a list, got {type(value).__name__}")
    out = []
    for a in value:
        if isinstance(a, (str, int, float)) and not isinstance(a, bool) and str(a).strip() and str(a).strip() not in out:
            out.append(str(a).strip())
    if not out:
        raise InputError(f"{where}: no gold answer")
    return out


def check_unique(questions: list[Question], path: Path) -> list[Question]:
    seen: set[str] = set()
    for q in questions:
        if q.id in seen:
            raise InputError(f"{path}: duplicate question id {q.id!r}")
        seen.add(q.id)
    if not questions:
        raise InputError(f"{path}: no questions")
    return questions
