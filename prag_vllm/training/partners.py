"""Merge-aware training: a document's adapter learns beside other documents' adapters.

At query time the top-k documents' adapters are merged exactly, so their updates add up:
an adapter answers its document's questions next to k-1 others, and they answer theirs
next to it. Trained alone, an adapter learns a question's shape more than its subject.
Merged, each one pushes its own answer on every question of that shape ("In which year
was X founded?" -> its own year), and single-hop F1 falls from 0.57 with the gold
adapter alone to 0.24 at k=3 (docs/recipes.md, merge interference).

With ``TrainConfig.merge_partners = n`` every optimizer step of a document merges the
adapters of ``n`` other documents, taken frozen from a finished adapter set
(``TrainConfig.partner_adapters``), into the document's own, exactly as serving merges
them, and adds one bare-question QA pair of each partner, answered with the partner's
answer. The document's adapter so learns to answer its own questions inside a merge and
to leave the partners' questions to them. Partners and their QA pairs are drawn per step,
seeded by the document id. Batched trainer only.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

from prag_vllm.adapters import AdapterStore
from prag_vllm.augment import Augmentation
from prag_vllm.corpus import Document
from prag_vllm.errors import AdapterError, InputError
from prag_vllm.sequences import Example

logger = logging.getLogger(__name__)

MAX_PARTNERS = 256
"""Partner adapters held in memory at most (about 3.3 MB each for Qwen2.5-0.5B at rank 2,
float32); a larger corpus uses a seeded sample of this many."""


@dataclass
class PartnerBank:
    """Frozen adapters of other documents, stacked per layer, and their QA pairs."""

    name: str
    """The partner adapter set's directory name (its training key), recorded in each adapter's metadata."""
    ids: list[str]
    """Partner document ids; index ``i`` is row ``i`` of every stacked tensor."""
    qa: list[list[dict]]
    """Each partner's QA pairs (``question``, ``answer``)."""
    weights: dict[str, tuple]
    """Per module path: (A ``[M, r, in]``, B ``[M, out, r]``), float32, B scaled so that the
    trainer's scaling ``alpha / r`` gives each partner's own update."""
    _examples: dict[tuple[int, int], Example] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, root: str | Path, docs: list[Document], augmentations: dict[str, Augmentation], *,
             scaling: float, seed: int = 0) -> PartnerBank:
        """The adapters in the set ``root`` of the documents of ``docs`` that have QA pairs."""
        import torch

        store = AdapterStore(root)
        if not store.root.is_dir():
            raise InputError(f"partner adapter set not found: {store.root}")
        ids = [d.id for d in docs if d.id in store and augmentations.get(d.id) and augmentations[d.id].qa]
        if len(ids) > MAX_PARTNERS:
            ids = sorted(random.Random(seed).sample(ids, MAX_PARTNERS))
        if len(ids) < 2:
            raise InputError(f"merge-aware training needs at least 2 partner adapters with QA pairs in {store.root}, "
                             f"found {len(ids)}: train the partner set first")
        adapters = [store.load(i) for i in ids]
        modules = list(adapters[0].weights)
        if any(set(ad.weights) != set(modules) for ad in adapters):
            raise AdapterError(f"partner adapters in {store.root} target different modules")
        weights = {m: (torch.stack([ad.weights[m][0].float() for ad in adapters]),
                       torch.stack([ad.weights[m][1].float() * (ad.scaling / scaling) for ad in adapters]))
                   for m in modules}
        logger.info("merge-aware training: %d partner adapters from %s", len(ids), store.root)
        return cls(name=store.root.name, ids=ids, qa=[list(augmentations[i].qa) for i in ids], weights=weights)

    def draw(self, doc_id: str, n: int, rng: random.Random) -> list[tuple[int, int]]:
        """``n`` distinct partners other than ``doc_id``, each with one of its QA pairs: (partner, pair)."""
        pool = [i for i, d in enumerate(self.ids) if d != doc_id]
        if len(pool) < n:
            raise InputError(f"merge_partners={n} but only {len(pool)} partner adapters besides {doc_id!r}")
        return [(p, rng.randrange(len(self.qa[p]))) for p in rng.sample(pool, n)]

    def example(self, tokenizer, partner: int, pair: int, max_length: int) -> Example:
        """Partner ``partner``'s QA pair ``pair`` as a bare question answered (tokenised once)."""
        from prag_vllm.recipes import answer_example

        key = (partner, pair)
        if key not in self._examples:
            qa = self.qa[partner][pair]
            self._examples[key] = answer_example(tokenizer, qa["question"], qa["answer"], max_length=max_length)
        return self._examples[key]
