"""What each document trains on, step by step, and how a round's sequences are batched.

:func:`plan_document` reproduces :class:`prag_vllm.parameterize.DocumentTrainer`'s data
exactly: the same recipe's examples (token ids and loss targets), the same init seed,
the same per-epoch order, the same steps. Each round
of the batched trainer runs one step of every document in flight; :func:`micro_batches`
groups that round's sequences by length (by default only equal lengths: no padding).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

import torch

from prag_vllm.augment import Augmentation
from prag_vllm.corpus import Document
from prag_vllm.errors import InputError
from prag_vllm.parameterize import TrainConfig, init_seed, source_digest, step_order, training_examples
from prag_vllm.sequences import Example
from prag_vllm.training.partners import PartnerBank

logger = logging.getLogger(__name__)


@dataclass
class DocPlan:
    """One document's training run, fixed before it starts."""

    doc: Document
    """The document."""
    seed: int
    """Seed of its LoRA init."""
    examples: list[Example]
    """Its training sequences: token ids, loss targets, objective (truncated to ``max_length``)."""
    steps: list[list[int]]
    """Per optimizer step, the indices of the sequences it trains on, in order."""
    source: str = ""
    """Digest of the document's text and augmentation (:func:`~prag_vllm.parameterize.source_digest`)."""
    teacher: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """``kl`` sequences: teacher top-k (token ids, log-probabilities) per target, filled on admission."""
    partners: list[list[int]] = field(default_factory=list)
    """Merge-aware training: per step, the partner adapters (rows of the trainer's
    :class:`~prag_vllm.training.partners.PartnerBank`) merged into this document's; empty when off."""

    @property
    def sequences(self) -> list[list[int]]:
        return [ex.input_ids for ex in self.examples]

    @property
    def tokens(self) -> int:
        """Tokens it trains on over all epochs (the per-document trainer's count)."""
        return sum(len(self.examples[i].input_ids) for step in self.steps for i in step)


def plan_document(doc: Document, aug: Augmentation | None, tokenizer, cfg: TrainConfig,
                  bank: PartnerBank | None = None) -> DocPlan:
    """The sequences and step order :class:`~prag_vllm.parameterize.DocumentTrainer` would use;
    with ``cfg.merge_partners``, each step also gets its partners and one QA pair of each."""
    examples = training_examples(doc, aug, tokenizer, cfg)
    plan = DocPlan(doc=doc, seed=init_seed(cfg, doc.id), examples=examples,
                   steps=step_order(cfg, len(examples), doc.id), source=source_digest(doc, aug))
    if cfg.merge_partners and plan.steps:
        if bank is None:
            raise InputError("merge_partners is set but the trainer has no partner adapters")
        rng = random.Random(f"partners\0{cfg.seed}\0{doc.id}")
        index: dict[tuple[int, int], int] = {}
        for step in plan.steps:
            drawn = bank.draw(doc.id, cfg.merge_partners, rng)
            for key in drawn:
                if key not in index:
                    index[key] = len(examples)
                    examples.append(bank.example(tokenizer, *key, max_length=cfg.max_length))
                step.append(index[key])
            plan.partners.append([p for p, _ in drawn])
    return plan


def micro_batches(rows: list[tuple[int, list[int]]], max_tokens: int,
                  max_padding: float = 0.0) -> list[list[tuple[int, list[int]]]]:
    """Split ``(slot, token ids)`` rows into micro-batches by length.

    Rows are taken longest first; a row joins the current micro-batch while the batch
    stays within ``max_tokens`` padded tokens and at most ``max_padding`` of its tokens
    are padding. With ``max_padding=0`` only rows of equal length share a micro-batch:
    no padding at all, and each row is computed exactly as it would be alone. A row longer
    than ``max_tokens`` forms a micro-batch of its own.
    """
    ordered = sorted(rows, key=lambda r: len(r[1]), reverse=True)
    batches: list[list[tuple[int, list[int]]]] = []
    real = 0
    for row in ordered:
        if batches:
            width, n = len(batches[-1][0][1]), len(batches[-1]) + 1
            if n * width <= max_tokens and (real + len(row[1])) >= (1 - max_padding) * n * width:
                batches[-1].append(row)
                real += len(row[1])
                continue
        batches.append([row])
        real = len(row[1])
    return batches
