"""ComplexWebQuestions: the original dev JSON or the flattened list many repositories use.

Original (``ComplexWebQuestions_dev.json``): ``ID, question, machine_question,
compositionality_type (composition / conjunction / comparative / superlative),
answers=[{answer, answer_id, aliases=[...]}], ...``. Flattened: ``test_id`` (or ``ID``),
``question``, ``answer=[aliases]``. Every answer and alias is a gold alias. No passages.
"""

from __future__ import annotations

from pathlib import Path

from prag_vllm.datasets.base import Dataset, alias_list, check_unique, read_json_list, text_field
from prag_vllm.errors import InputError
from prag_vllm.pipeline import Question

NAME = "complexwebquestions"
SUBTYPES = ("composition", "conjunction", "comparative", "superlative")


def sniff(kind: str, records: list[dict]) -> bool:
    first = records[0]
    if kind != "json" or "question" not in first or "context" in first:
        return False
    return ("machine_question" in first or "compositionality_type" in first or "webqsp_ID" in first
            or ("test_id" in first and isinstance(first.get("answer"), list)))


def _aliases(row: dict, where: str) -> list[str]:
    if isinstance(row.get("answers"), list) and all(isinstance(a, dict) for a in row["answers"]):
        out: list[str] = []
        for a in row["answers"]:
            for alias in [a.get("answer"), *(a.get("aliases") or [])]:
                if isinstance(alias, str) and alias.strip() and alias.strip() not in out:
                    out.append(alias.strip())
        if not out:
            raise InputError(f"{where}: no gold answer")
        return out
    return alias_list(row.get("answer", row.get("answers")), where)


def load(path: Path) -> Dataset:
    questions = []
    for n, row in enumerate(read_json_list(path, NAME)):
        where = f"{path}: question {n}"
        qid = row.get("ID", row.get("test_id", row.get("id", n)))
        qtype = row.get("compositionality_type")
        questions.append(Question(id=str(qid), question=text_field(row, "question", where),
                                  answers=_aliases(row, where), type=str(qtype) if qtype else None))
    return Dataset(NAME, path, check_unique(questions, path), None, SUBTYPES)
