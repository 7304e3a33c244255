"""The five answering modes, as small strategy classes registered by name.

The question wording is shared with training (:func:`question_prompt`), so a
parametric adapter is trained on exactly the turn it is later asked.
"""

from __future__ import annotations

from dataclasses import dataclass

from prag_vllm.augment import Augmentation
from prag_vllm.corpus import Document
from prag_vllm.errors import InputError

QUESTION_TEMPLATE = "Answer the question with a short phrase, no explanation.\nQuestion: {question}"
CONTEXT_TEMPLATE = "Context:\n{context}\n\n"


def question_prompt(question: str) -> str:
    return QUESTION_TEMPLATE.format(question=question.strip())


def context_block(passages: list[str]) -> str:
    """The passages as shown in a prompt (numbered), or "" when there are none."""
    if not passages:
        return ""
    return CONTEXT_TEMPLATE.format(context="\n\n".join(f"[{i}] {p}" for i, p in enumerate(passages, 1)))


def _context_message(question: str, passages: list[str]) -> list[dict]:
    return [{"role": "user", "content": context_block(passages) + question_prompt(question)}]


@dataclass(frozen=True)
class Mode:
    """How one question is answered."""

    name: str = ""
    retrieves: bool = True
    """Whether top-k documents are retrieved."""
    parametric: bool = False
    """Whether the merged adapter of the retrieved documents is applied."""
    description: str = ""

    def passages(self, in_context: list[Document], augmentations: dict[str, Augmentation] | None = None) -> list[str]:
        """The text shown in the prompt for each in-context document."""
        return [d.passage for d in in_context]

    def messages(self, question: str, in_context: list[Document],
                 augmentations: dict[str, Augmentation] | None = None) -> list[dict]:
        """Chat messages for ``question``; ``in_context`` are documents to show in the prompt."""
        return _context_message(question, self.passages(in_context, augmentations))


@dataclass(frozen=True)
class ClosedBook(Mode):
    name: str = "closed-book"
    retrieves: bool = False
    description: str = "no retrieval: the bare question to the base model"


@dataclass(frozen=True)
class Standard(Mode):
    name: str = "standard"
    description: str = "standard RAG: top-k passages in the prompt"


@dataclass(frozen=True)
class DARag(Mode):
    name: str = "da-rag"
    description: str = "DA-RAG: passages, their rewrites and QA pairs in the prompt"

    def passages(self, in_context, augmentations=None):
        augmentations = augmentations or {}
        passages = []
        for d in in_context:
            aug = augmentations.get(d.id)
            parts = [d.passage] + ([*aug.rewrites, *(f"Q: {p['question']} A: {p['answer']}" for p in aug.qa)] if aug else [])
            passages.append("\n".join(parts))
        return passages


@dataclass(frozen=True)
class Parametric(Mode):
    name: str = "parametric"
    parametric: bool = True
    description: str = "Parametric RAG: merged adapter, bare question (documents without an adapter go in context)"


@dataclass(frozen=True)
class Combined(Mode):
    name: str = "combined"
    parametric: bool = True
    description: str = "merged adapter and the passages in the prompt"


MODES: dict[str, Mode] = {m.name: m for m in (ClosedBook(), Standard(), DARag(), Parametric(), Combined())}


def get_mode(name: object) -> Mode:
    if not isinstance(name, str) or name not in MODES:
        raise InputError(f"unknown mode {name!r}; choose from {', '.join(MODES)}")
    return MODES[name]
