"""Named training recipes: which sequences a document trains on, with which loss.

A recipe is a small subclass of :class:`Recipe` (the way peft adds LoRA variants):
:meth:`Recipe.pieces` lists a document's training sequences as role-tagged text
(:mod:`prag_vllm.sequences`), and the recipe's fields give the loss policy and
the optimisation defaults. The recipe's name and settings are part of the adapter
store's key (:func:`prag_vllm.workspace.training_settings`), so adapters of two recipes
never mix.

- ``paper``: PRAG's code (oneal2000/PRAG ``src/encode.py`` and ``prompt_template.py``)
  as it is, defects included: 5 sequences per document (QA 1 and 2 once with the passage
  and once with the rewrite in PRAG's user prompt, QA 3 without a passage), the
  generation prompt followed by ``The answer is {answer}.`` with no end of turn, loss on
  every token, 1 epoch, no shuffling, one shared random init for every document.
- ``plain``: the document and its rewrites as plain text (loss on the text), every QA pair
  asked as at inference with the bare question, and again with the passage in the prompt
  (loss on the answer and the end-of-turn token only).
- ``default``: the recipe measured best here (docs/recipes.md): ``plain`` plus counterfactual
  contexts -- each QA pair over its passage with the answer replaced by a stand-in, answered
  with the stand-in, so that a passage in the prompt overrides what the adapter learned
  (:class:`DefaultRecipe`).
- ``distill``: ``plain``'s sequences, but the bare-question QA turns learn the
  next-token distribution of a teacher -- the base model with the passage in its prompt
  -- on the answer tokens (KL divergence; context distillation as in Knowledge Modules,
  arXiv 2503.08727). Batched trainer only.
- ``specific``: ``distill`` plus locality: questions about a scrambled subject keep the base
  model's distribution (:class:`SpecificRecipe`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from prag_vllm.augment import Augmentation, title_words
from prag_vllm.corpus import Document
from prag_vllm.errors import InputError
from prag_vllm.modes import context_block, question_prompt
from prag_vllm.sequences import Example, Piece, chat_pieces, check_loss_policy, make_example

PAPER_USER_PROMPT = ("You should answer the question by referring to the knowledge provided below and "
                     "integrating your own knowledge.\n{passages}\n\nQuestion: {question}")
"""PRAG's ``USER_PROMPT`` (its ``prompt_template.py``)."""


def _paper_question(q: str) -> str:
    q = q.strip()
    if q.endswith(" ?"):
        q = q[:-1].strip() + "?"
    return q if q.endswith("?") else q + "?"


def _paper_answer(a: str) -> str:
    a = a.strip()
    return a if a.endswith(".") else a + "."


@dataclass(frozen=True)
class Recipe:
    """How one document's adapter is trained; subclasses define the sequences."""

    name: str = ""
    loss_policy: str = "content"
    """Default loss policy (``full``, ``content`` or ``answer``; see sequences.LOSS_POLICIES)."""
    epochs: int = 3
    """Default passes over the document's sequences."""
    lr: float = 3e-4
    """Default AdamW learning rate."""
    shuffle: bool = True
    """Shuffle the sequences every epoch (seeded by the document id)."""
    shared_init: bool = False
    """Every document starts from the same random LoRA (seeded by the base seed only)."""
    eot_after_answer: bool = True
    """The template's end-of-turn token after an answer is trained with it."""
    distill: bool = False
    """Bare-question QA turns learn a teacher's distribution (KL) instead of the answer tokens."""
    description: str = ""

    def pieces(self, doc: Document, aug: Augmentation | None, tokenizer) -> list[tuple[list[Piece], str]]:
        """The document's sequences, each as pieces plus its objective: ``ce``; ``kl`` (learn the
        teacher's distribution on the answer, the teacher's sequence from :meth:`teacher_pieces`);
        ``kl-base`` (keep the base model's own distribution on this very sequence)."""
        raise NotImplementedError

    def examples(self, doc: Document, aug: Augmentation | None, tokenizer, *, policy: str | None = None,
                 max_length: int = 512) -> list[Example]:
        """Tokenised sequences with their loss targets; sequences without any target are dropped."""
        policy = check_loss_policy(policy or self.loss_policy)
        out = []
        for pieces, objective in self.pieces(doc, aug, tokenizer):
            chat = any(p.role == "template" for p in pieces)
            ex = make_example(tokenizer, pieces, policy, max_length=max_length, eot_after_answer=self.eot_after_answer,
                              add_special_tokens=not chat)
            if objective in ("kl", "kl-base"):  # KL on the answer tokens (and end of turn), whatever the policy
                teacher = pieces if objective == "kl-base" else self.teacher_pieces(doc, pieces, tokenizer)
                tex = make_example(tokenizer, teacher, "answer", max_length=max_length,
                                   eot_after_answer=self.eot_after_answer)
                kl = make_example(tokenizer, pieces, "answer", max_length=max_length,
                                  eot_after_answer=self.eot_after_answer)
                if kl.n_targets and _target_tokens(kl) == _target_tokens(tex):
                    ex = kl
                    ex.objective, ex.teacher_ids, ex.teacher_targets = "kl", tex.input_ids, tex.targets
                # else (truncated, or the answer tokenised differently): cross-entropy under the policy
            if ex.n_targets:
                out.append(ex)
        return out

    def teacher_pieces(self, doc: Document, student: list[Piece], tokenizer) -> list[Piece]:
        """The teacher's sequence for a ``kl`` sequence (same answer, ending the same way)."""
        raise InputError(f"recipe {self.name!r} has no teacher")


def _target_tokens(ex: Example) -> list[int]:
    return [t for t, m in zip(ex.input_ids, ex.targets) if m]


def _qa(aug: Augmentation | None) -> list[dict]:
    return list(aug.qa) if aug else []


def _ask(tokenizer, question: str, answer: str, passages: list[str] | None = None) -> list[Piece]:
    """A QA turn worded exactly as the answering modes ask it (modes.py)."""
    user = []
    if passages:
        user.append(Piece(context_block(passages), "context"))
    head, _, tail = question_prompt(question).rpartition(question.strip())
    user += [Piece(head, "template"), Piece(question.strip(), "question"), Piece(tail, "template")]
    return chat_pieces(tokenizer, [p for p in user if p.text], answer.strip())


@dataclass(frozen=True)
class PaperRecipe(Recipe):
    name: str = "paper"
    loss_policy: str = "full"
    epochs: int = 1
    shuffle: bool = False
    shared_init: bool = True
    eot_after_answer: bool = False
    description: str = "PRAG's code: 5 sequences, 'The answer is X.', full loss, no end of turn, 1 epoch"

    def pieces(self, doc, aug, tokenizer):
        # PRAG's three QA pairs, however many augmentation wrote (--n-qa)
        qas, rewrite = _qa(aug)[:3], (aug.rewrites[0] if aug and aug.rewrites else None)
        with_passage = (len(qas) + 1) // 2
        out = []
        for i, qa in enumerate(qas):
            variants = [doc.passage, rewrite] if i < with_passage else [None]
            for passage in variants:
                if i < with_passage and passage is None:
                    continue
                head, _, tail = PAPER_USER_PROMPT.partition("{passages}")
                user = [Piece(head, "template")]
                if passage:
                    user += [Piece("Passage 1: ", "template"), Piece(passage, "context"), Piece("\n", "template")]
                user += [Piece(tail.partition("{question}")[0], "template"),
                         Piece(_paper_question(qa["question"]), "question")]
                pieces = chat_pieces(tokenizer, user)
                pieces.append(Piece("The answer is ", "template"))
                pieces.append(Piece(_paper_answer(qa["answer"]), "answer"))
                out.append((pieces, "ce"))
        if not out:  # no QA pairs: the passage alone, as plain text
            out.append(([Piece(doc.passage, "passage")], "ce"))
        return out


@dataclass(frozen=True)
class PlainRecipe(Recipe):
    name: str = "plain"
    description: str = ("passage + rewrites as text, QA turns as asked at inference (bare and with the passage), "
                        "loss on passage and answer tokens, end of turn trained (default's sequences before 2026-12-06)")

    def pieces(self, doc, aug, tokenizer):
        out = [([Piece(p, "passage")], "ce") for p in [doc.passage, *(aug.rewrites if aug else [])]]
        for qa in _qa(aug):
            out.append((_ask(tokenizer, qa["question"], qa["answer"]), "kl" if self.distill else "ce"))
            out.append((_ask(tokenizer, qa["question"], qa["answer"], [doc.passage]), "ce"))
        return out

    def teacher_pieces(self, doc, student, tokenizer):
        question = next(p.text for p in student if p.role == "question")
        answer = next(p.text for p in student if p.role == "answer")
        return _ask(tokenizer, question, answer, [doc.passage])


def counterfactual(answer: str, key: str) -> str:
    """A deterministic stand-in for ``answer`` that is surely not it: a number moved by a
    non-zero offset (same number of digits), otherwise every word of four or more letters with
    its inner letters shuffled (first and last kept, case kept). ``key`` seeds the choice."""
    import random

    rng = random.Random(hashlib.sha256(f"{key}\0{answer}".encode()).digest())
    a = answer.strip()
    if a.isdigit():
        lo, hi = 10 ** (len(a) - 1) if len(a) > 1 else 0, 10 ** len(a) - 1
        moved = [v for v in range(max(lo, int(a) - 90), min(hi, int(a) + 90) + 1) if v != int(a)]
        return str(rng.choice(moved)) if moved else a
    words = []
    for w in a.split(" "):
        inner = list(w[1:-1])
        if len(w) >= 4 and w.isalpha() and len(set(inner)) > 1:
            shuffled = inner[:]
            while shuffled == inner:
                rng.shuffle(shuffled)
            w = (w[0] + "".join(shuffled) + w[-1]).lower() if w.islower() else w[0] + "".join(shuffled).lower() + w[-1]
        words.append(w)
    return " ".join(words)


@dataclass(frozen=True)
class DefaultRecipe(PlainRecipe):
    """``plain`` plus counterfactual contexts (as knowledge-aware fine-tuning does, Li et al.
    2022, arXiv 2211.05110): each QA pair once more with a passage in which its answer was
    replaced by a stand-in (:func:`counterfactual`), answered with the stand-in. The adapter
    learns its document's facts from the bare questions and, from these, that a passage in the
    prompt overrides what it learned -- so in the combined mode the merged adapters of other
    documents do not outvote the passage that answers the question. Measured best
    (docs/recipes.md; it ran there under the name ``faithful``)."""

    name: str = "default"
    description: str = ("plain's sequences (passage and rewrites as text, QA turns bare and with the passage), plus "
                        "each QA pair over a counterfactual passage (its answer replaced) answered from that passage")

    def pieces(self, doc, aug, tokenizer):
        out = super().pieces(doc, aug, tokenizer)
        for qa in _qa(aug):
            answer = qa["answer"].strip()
            fake = counterfactual(answer, doc.id)
            if fake != answer and answer in doc.passage and fake not in doc.passage:
                out.append((_ask(tokenizer, qa["question"], fake, [doc.passage.replace(answer, fake)]), "ce"))
        return out


@dataclass(frozen=True)
class DistillRecipe(PlainRecipe):
    name: str = "distill"
    distill: bool = True
    description: str = ("default's sequences; bare-question QA turns learn the teacher's (base model with the "
                        "passage in its prompt) next-token distribution on the answer (KL)")


def other_subject(question: str, doc: Document) -> str | None:
    """``question`` about a subject that does not exist: every title word (three or more letters)
    in it replaced by :func:`counterfactual` of itself; None when it names no title word."""
    import re

    words = {w for w in title_words(doc.title) if w.isalpha()}
    out = question
    for w in sorted(words, key=len, reverse=True):
        out = re.sub(rf"\b{re.escape(w)}\b", counterfactual(w, doc.id), out)
    return out if out != question else None


@dataclass(frozen=True)
class SpecificRecipe(DistillRecipe):
    """``distill`` plus locality: each QA question asked once more about a subject that does not
    exist (the title's words scrambled, :func:`other_subject`), where the adapter must leave the
    base model's next-token distribution as it is (KL to the base model on that very sequence,
    as knowledge editors keep unrelated prompts unchanged). The adapter learns to answer only
    about its own document, so in a merge it does not answer other documents' questions."""

    name: str = "specific"
    description: str = ("distill's sequences, plus each QA question about a scrambled subject, kept at the base "
                        "model's distribution (KL): the adapter answers only about its document")

    def pieces(self, doc, aug, tokenizer):
        out = super().pieces(doc, aug, tokenizer)
        for qa in _qa(aug):
            other = other_subject(qa["question"], doc)
            if other:
                out.append((_ask(tokenizer, other, counterfactual(qa["answer"], doc.id)), "kl-base"))
        return out


RECIPES: dict[str, Recipe] = {r.name: r for r in (DefaultRecipe(), PaperRecipe(), PlainRecipe(), DistillRecipe(),
                                                     SpecificRecipe())}


def get_recipe(name: object) -> Recipe:
    if not isinstance(name, str) or name not in RECIPES:
        raise InputError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
    return RECIPES[name]


def answer_example(tokenizer, question: str, answer: str, *, max_length: int = 512) -> Example:
    """A bare-question QA turn as the answering modes ask it, with loss on the answer and its
    end of turn only (merge-aware training's partner questions, :mod:`prag_vllm.training.partners`)."""
    return make_example(tokenizer, _ask(tokenizer, question, answer), "answer", max_length=max_length)
