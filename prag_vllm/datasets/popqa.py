"""PopQA: the original TSV (``popQA.tsv``) or JSON Lines redistributions.

TSV columns include ``id, subj, prop, obj, ..., s_pop, o_pop, question, possible_answers``
where ``possible_answers`` is a JSON-encoded list of aliases. JSON Lines rows carry
``question`` and ``possible_answers`` (a list or a JSON-encoded list) or ``golden_answers``
(a list). PopQA has no sub-type (``prop`` is the relation, not a question type) and no
passages.
"""

from __future__ import annotations

import csv
from pathlib import Path

from prag_vllm.datasets.base import Dataset, alias_list, check_unique, text_field
from prag_vllm.errors import InputError
from prag_vllm.fileio import read_jsonl
from prag_vllm.pipeline import Question

NAME = "popqa"
SUBTYPES: tuple[str, ...] = ()
ANSWER_KEYS = ("possible_answers", "golden_answers")


def sniff(kind: str, records: list[dict]) -> bool:
    first = records[0]
    return kind in ("jsonl", "tsv", "json") and any(k in first for k in ANSWER_KEYS)


def _rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        head = fh.readline()
    if head.lstrip().startswith("{"):
        return read_jsonl(path)
    if "\t" not in head:
        raise InputError(f"{path}: neither JSON Lines nor a tab-separated file with a header")
    csv.field_size_limit(1 << 24)
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        rows = list(reader)
    for n, row in enumerate(rows, 2):
        if None in row or any(v is None for v in row.values()):
            raise InputError(f"{path}: line {n} does not have the header's {len(reader.fieldnames or [])} columns")
    return rows


def load(path: Path) -> Dataset:
    questions = []
    for n, row in enumerate(_rows(path), 1):
        where = f"{path}: row {n}"
        key = next((k for k in ANSWER_KEYS if k in row), None)
        if key is None:
            raise InputError(f"{where}: no 'possible_answers' or 'golden_answers'")
        qid = row.get("id")
        questions.append(Question(id=str(qid) if qid not in (None, "") else str(n),
                                  question=text_field(row, "question", where), answers=alias_list(row[key], where)))
    return Dataset(NAME, path, check_unique(questions, path), None, SUBTYPES)
