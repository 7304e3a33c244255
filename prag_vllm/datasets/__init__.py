"""Question-answering datasets in their native formats, detected from the file content.

Each format is one module with ``NAME``, ``SUBTYPES``, ``sniff(kind, records)`` and
``load(path) -> Dataset``; :data:`FORMATS` maps names to modules, tried in order by
:func:`detect_format` (the most specific first, the generic JSON Lines last).

| name | file | sub-type | passages |
|---|---|---|---|
| ``2wikimultihopqa`` | dev JSON list | comparison / bridge_comparison / inference / compositional | pooled ``context`` |
| ``hotpotqa`` | dev distractor JSON list | bridge / comparison | pooled ``context`` |
| ``complexwebquestions`` | JSON list (original or flattened) | compositionality_type (original only) | none |
| ``popqa`` | TSV or JSON Lines | none | none |
| ``jsonl`` | JSON Lines / JSON list: question, answers, type | ``type`` | none |
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from types import ModuleType

from prag_vllm.datasets import cwq, hotpotqa, jsonl, popqa, twowiki
from prag_vllm.datasets.base import Dataset
from prag_vllm.errors import InputError
from prag_vllm.pipeline import Question

logger = logging.getLogger(__name__)

FORMATS: dict[str, ModuleType] = {m.NAME: m for m in (twowiki, hotpotqa, cwq, popqa, jsonl)}
"""Format name -> loader module, in detection order."""
SNIFF_RECORDS = 50


def _sample(path: Path) -> tuple[str, list[dict]]:
    """The file's kind (json / jsonl / tsv) and its first records, for :func:`detect_format`."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        head = fh.read(1 << 16)
    text = head.lstrip()
    if not text:
        raise InputError(f"dataset file is empty: {path}")
    if text.startswith("["):
        from prag_vllm.datasets.base import read_json_list

        return "json", read_json_list(path, "")[:SNIFF_RECORDS]
    first_line = text.split("\n", 1)[0]
    if text.startswith("{"):
        try:
            row = json.loads(first_line)
        except json.JSONDecodeError:
            raise InputError(f"{path}: a JSON object, not a list of questions or JSON Lines") from None
        if not isinstance(row, dict):
            raise InputError(f"{path}: first line is not a JSON object")
        return "jsonl", [row]
    if "\t" in first_line:
        header = first_line.rstrip("\r").split("\t")
        return "tsv", [dict.fromkeys(header, "")]
    raise InputError(f"{path}: not a recognised dataset file (JSON list, JSON Lines or TSV with a header)")


def detect_format(path: str | os.PathLike) -> str:
    """Name of the format of ``path``, from its content; :class:`InputError` if none fits."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"dataset file not found: {path}")
    kind, records = _sample(path)
    for name, module in FORMATS.items():
        if module.sniff(kind, records):
            return name
    keys = ", ".join(sorted(records[0]))[:200]
    raise InputError(f"{path}: unknown dataset format ({kind} with fields {keys}); "
                     f"expected one of {', '.join(FORMATS)}")


def load_dataset(path: str | os.PathLike, fmt: str | None = None) -> Dataset:
    """Load a QA file in its native format (detected unless ``fmt`` names one)."""
    path = Path(path)
    if fmt is None:
        fmt = detect_format(path)
    elif fmt not in FORMATS:
        raise InputError(f"unknown dataset format {fmt!r}; choose from {', '.join(FORMATS)}")
    elif not path.is_file():
        raise InputError(f"dataset file not found: {path}")
    ds = FORMATS[fmt].load(path)
    logger.info("%s: %d %s questions%s", path, len(ds.questions), fmt,
                f", {len(ds.documents)} passages" if ds.documents is not None else "")
    return ds


def select_questions(questions: list[Question], limit: int | None = None,
                     per_type: int | None = None) -> list[Question]:
    """The first ``limit`` questions, or the first ``per_type`` of each sub-type (file order kept)."""
    if limit is not None and per_type is not None:
        raise InputError("give a number of questions or a number per sub-type, not both")
    if per_type is not None:
        counts: dict[str | None, int] = {}
        out = []
        for q in questions:
            if counts.get(q.type, 0) < per_type:
                counts[q.type] = counts.get(q.type, 0) + 1
                out.append(q)
        return out
    return questions[:limit] if limit is not None else list(questions)


def subtype_order(ds: Dataset, questions: list[Question]) -> list[str]:
    """Sub-types present in ``questions``: the format's known ones in paper order, then the rest."""
    present = list(dict.fromkeys(q.type for q in questions if q.type is not None))
    return [t for t in ds.subtypes if t in present] + [t for t in present if t not in ds.subtypes]


__all__ = ["Dataset", "FORMATS", "detect_format", "load_dataset", "select_questions", "subtype_order"]
