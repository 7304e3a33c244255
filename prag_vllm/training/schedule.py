"""What each document trains on, step by step, and how a round's sequences are batched.

:func:`plan_document` reproduces :class:`prag_vllm.parameterize.DocumentTrainer`'s data
exactly: the same tokenised training texts, the same seed (from the document id), the
same per-epoch shuffle drawn from a generator seeded with it, the same steps. Each round
of the batched trainer runs one step of every document in flight; :func:`micro_batches`
groups that round's sequences by length (by default only equal lengths: no padding).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from prag_vllm.augment import Augmentation
from prag_vllm.corpus import Document
from prag_vllm.parameterize import _doc_seed as doc_seed, training_texts

logger = logging.getLogger(__name__)


@dataclass
class DocPlan:
    """One document's training run, fixed before it starts."""

    doc: Document
    """The document."""
    seed: int
    """Seed of its LoRA init and of its shuffles."""
    sequences: list[list[int]]
    """Token ids of its training sequences (truncated to ``max_length``)."""
    steps: list[list[int]]
    """Per optimizer step, the indices of the sequences it trains on, in order."""

    @property
    def tokens(self) -> int:
        """Tokens it trains on over all epochs (the per-document trainer's count)."""
        return sum(len(self.sequences[i]) for step in self.steps for i in step)


def plan_document(doc: Document, aug: Augmentation | None, tokenizer, *, epochs: int, batch_size: int,
                  max_length: int, seed: int) -> DocPlan:
    """The sequences and step order :class:`~prag_vllm.parameterize.DocumentTrainer` would use."""
    s = doc_seed(seed, doc.id)
    enc = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"]
           for t in training_texts(doc, aug, tokenizer)]
    gen = torch.Generator().manual_seed(s)
    steps = []
    for _ in range(epochs):
        order = torch.randperm(len(enc), generator=gen).tolist()
        steps += [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return DocPlan(doc=doc, seed=s, sequences=enc, steps=steps)


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
