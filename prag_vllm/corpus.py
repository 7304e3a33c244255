"""Documents: the retrieval corpus and the unit that gets one LoRA each.

A corpus is read from

* JSON Lines with ``id``, ``title`` (optional) and ``text`` per line, or
* the ``context`` paragraphs of a HotpotQA or 2WikiMultihopQA file in its native
  format (a JSON list of questions, each ``context = [[title, [sentence, ...]], ...]``),
  pooled and deduplicated by title + text into a closed retrieval corpus.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from prag_vllm.errors import InputError
from prag_vllm.fileio import read_jsonl

logger = logging.getLogger(__name__)

MAX_ID_LEN = 512


@dataclass(frozen=True)
class Document:
    """One retrievable passage; it is also the unit that gets its own LoRA."""

    id: str
    """Unique identifier; adapters are stored under a hash of it, never under the raw id."""
    title: str
    """Title (may be empty); indexed together with ``text``."""
    text: str
    """The passage itself."""

    @property
    def passage(self) -> str:
        """Title and text as they are shown to the model."""
        return f"{self.title}: {self.text}" if self.title else self.text

    def to_dict(self) -> dict:
        return asdict(self)


def _check_document(doc_id: object, title: object, text: object, where: str) -> Document:
    if not isinstance(doc_id, str) or not doc_id.strip():
        raise InputError(f"{where}: document has no 'id' (a non-empty string is required)")
    if len(doc_id) > MAX_ID_LEN or "\x00" in doc_id:
        raise InputError(f"{where}: document id is longer than {MAX_ID_LEN} characters or contains NUL")
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{where}: document {doc_id!r} has no 'text'")
    if title is None:
        title = ""
    if not isinstance(title, str):
        raise InputError(f"{where}: document {doc_id!r} has a non-string 'title'")
    return Document(id=doc_id, title=title.strip(), text=text.strip())


def load_jsonl_corpus(path: Path) -> list[Document]:
    docs = []
    for n, row in enumerate(read_jsonl(path), 1):
        doc_id = row.get("id")
        if isinstance(doc_id, int):
            doc_id = str(doc_id)
        docs.append(_check_document(doc_id, row.get("title"), row.get("text"), f"{path}: row {n}"))
    return docs


def join_sentences(sentences: list) -> str:
    """One paragraph from its sentences: HotpotQA's carry their leading space, 2Wiki's do not."""
    out = ""
    for s in map(str, sentences):
        out += s if not out or out[-1].isspace() or s[:1].isspace() else " " + s
    return out.strip()


def paragraphs_from_multihop(questions: list, where: str) -> list[Document]:
    """Pool the ``context`` paragraphs of HotpotQA / 2Wiki questions, deduplicated.

    The id of a paragraph is its title; a second, different paragraph with the same
    title gets ``title#2`` and so on, in file order (deterministic).
    """
    seen: dict[tuple[str, str], str] = {}
    per_title: dict[str, int] = {}
    docs: list[Document] = []
    for qn, item in enumerate(questions):
        ctx = item.get("context") if isinstance(item, dict) else None
        if not isinstance(ctx, list):
            raise InputError(f"{where}: question {qn} has no 'context' list (not a HotpotQA/2Wiki file?)")
        for para in ctx:
            if not (isinstance(para, (list, tuple)) and len(para) == 2 and isinstance(para[1], list)):
                raise InputError(f"{where}: question {qn}: a context entry is not [title, [sentences]]")
            title = str(para[0]).strip()
            text = join_sentences(para[1])
            if not text or (title, text) in seen:
                continue
            n = per_title.get(title, 0) + 1
            per_title[title] = n
            doc_id = title if n == 1 else f"{title}#{n}"
            seen[(title, text)] = doc_id
            docs.append(_check_document(doc_id, title, text, where))
    return docs


def load_corpus(path: str | os.PathLike) -> list[Document]:
    """Load a corpus file, detecting its format; raise :class:`InputError` on bad input."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"corpus file not found: {path}")
    with open(path, encoding="utf-8") as fh:
        head = fh.read(4096).lstrip()
    if not head:
        raise InputError(f"corpus file is empty: {path}")
    if head.startswith("["):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        docs = paragraphs_from_multihop(data, str(path))
    else:
        docs = load_jsonl_corpus(path)
    if not docs:
        raise InputError(f"corpus is empty: {path}")
    ids = [d.id for d in docs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise InputError(f"{path}: duplicate document id {dup!r}")
    logger.info("loaded %d documents from %s", len(docs), path)
    return docs


def save_corpus_jsonl(docs: list[Document], path: str | os.PathLike) -> None:
    from prag_vllm.fileio import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(d.to_dict(), ensure_ascii=False) + "\n" for d in docs))
