"""Shared reader of HotpotQA and 2WikiMultihopQA, which have the same record shape.

A record is ``{_id, question, answer, type, context=[[title, [sentence, ...]], ...], ...}``;
the ``context`` paragraphs of all records are pooled into a closed retrieval corpus
(deduplicated by title + text, :func:`prag_vllm.corpus.paragraphs_from_multihop`).
"""

from __future__ import annotations

from pathlib import Path

from prag_vllm.corpus import paragraphs_from_multihop
from prag_vllm.datasets.base import Dataset, alias_list, check_unique, read_json_list, text_field
from prag_vllm.pipeline import Question

ALIAS_KEYS = ("answer_aliases", "aliases")
"""Optional extra gold aliases some redistributions add next to ``answer``."""


def load_multihop(path: Path, name: str, subtypes: tuple[str, ...]) -> Dataset:
    data = read_json_list(path, name)
    questions = []
    for n, row in enumerate(data):
        where = f"{path}: question {n}"
        answers = alias_list(row.get("answer"), where)
        for key in ALIAS_KEYS:
            if row.get(key):
                answers += [a for a in alias_list(row[key], where) if a not in answers]
        qtype = row.get("type")
        questions.append(Question(id=str(row.get("_id", n)), question=text_field(row, "question", where),
                                  answers=answers, type=str(qtype) if qtype else None))
    docs = paragraphs_from_multihop(data, str(path))
    return Dataset(name, path, check_unique(questions, path), docs, subtypes)
