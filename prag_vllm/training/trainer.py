"""Batched parameterization: the LoRAs of many documents trained in one pass.

:class:`BatchedTrainer` keeps ``slots`` documents in flight (like a serving engine keeps
requests in flight). Each round runs one optimizer step of every document in flight: the
round's sequences (each document's own next batch) are packed by length into
micro-batches of mixed documents, every row's FFN update uses only its document's LoRA
(:mod:`prag_vllm.training.layer`), the loss is the sum of every document's own mean token
loss, so each document receives exactly the gradient of its own loss, and a per-slot
AdamW (:mod:`prag_vllm.training.optim`) steps every document on its own step count. A
finished document leaves its slot at once and the next one enters, with a fresh seeded
init and a fresh optimizer state.

Per document this is the same computation as
:class:`prag_vllm.parameterize.DocumentTrainer` (same sequences, shuffles, steps, init,
loss and update); only float rounding differs (tests/test_batched_train.py).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from prag_vllm.adapters import FFN_TARGETS, LoraAdapter
from prag_vllm.augment import Augmentation
from prag_vllm.corpus import Document
from prag_vllm.errors import AdapterError, InputError
from prag_vllm.parameterize import TrainConfig, recipe_meta
from prag_vllm.sequences import Example
from prag_vllm.training.layer import attach_stacked_lora
from prag_vllm.training.optim import SlotAdamW
from prag_vllm.training.partners import PartnerBank
from prag_vllm.training.schedule import DocPlan, micro_batches, plan_document

logger = logging.getLogger(__name__)


@dataclass
class BatchConfig:
    """How many documents train together and how their sequences are batched."""

    slots: int = 16
    """Documents in flight (their LoRAs, gradients and AdamW states stay in memory:
    about 13 MB per slot for Qwen2.5-0.5B at rank 2)."""
    max_batch_tokens: int = 2048
    """Tokens per micro-batch (one forward + backward); bounds activation memory."""
    max_padding: float = 0.0
    """Largest fraction of padding tokens in a micro-batch. 0: only sequences of equal
    length share a micro-batch -- no padding, and every document's result is bit-for-bit
    the one-document trainer's (measured). On 2 CPU cores padded batches were no faster
    (SmolLM2, bf16: 186 tok/s unpadded vs 191 tok/s at 10% padding); on a GPU, allow
    some (e.g. 0.1) for larger batches at a float-rounding-level difference."""
    loss_chunk_tokens: int = 256
    """Tokens whose vocabulary logits are materialised at once in the loss."""


@dataclass
class TrainedDocument:
    """One finished document."""

    doc: Document
    adapter: LoraAdapter
    stats: dict = field(default_factory=dict)


class _Row(NamedTuple):
    """One sequence of a round: its slot, the sequence, its ``kl`` teacher (or None) and the
    partner adapters merged into its slot's (merge-aware training, or None)."""

    slot: int
    example: Example
    teacher: tuple[torch.Tensor, torch.Tensor] | None
    partners: list[int] | None


@dataclass
class _Slot:
    plan: DocPlan
    started: float
    next_step: int = 0
    last_loss: float = float("nan")


def _frozen_linears_to_bf16(model: torch.nn.Module, lm_head: torch.nn.Module) -> None:
    """Store the frozen base Linear weights in bf16 once, instead of autocast re-casting them
    at every forward. Autocast runs ``linear`` in bf16 either way, so the results are the
    same bits; embeddings and norms keep float32 (a tied output layer gets its own copy)."""
    tied = lm_head.weight is model.get_input_embeddings().weight
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear) and not (mod is lm_head and tied):
            mod.weight.data = mod.weight.data.to(torch.bfloat16)
            if mod.bias is not None:
                mod.bias.data = mod.bias.data.to(torch.bfloat16)
    if tied:
        lm_head.weight = torch.nn.Parameter(lm_head.weight.detach().to(torch.bfloat16), requires_grad=False)


class BatchedTrainer:
    """One frozen base model with stacked LoRAs for ``batch.slots`` documents at a time."""

    def __init__(self, model_path: str | os.PathLike, cfg: TrainConfig | None = None,
                 batch: BatchConfig | None = None, model=None, tokenizer=None, partners: PartnerBank | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg or TrainConfig()
        self.batch = batch or BatchConfig()
        if self.batch.slots < 1 or self.batch.max_batch_tokens < 1 or self.batch.loss_chunk_tokens < 1:
            raise InputError("slots, max_batch_tokens and loss_chunk_tokens must be positive")
        if not 0.0 <= self.batch.max_padding < 1.0:
            raise InputError(f"max_padding must be in [0, 1), got {self.batch.max_padding}")
        self.model_path = str(model_path)
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(self.model_path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = model or AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32)
        self.model.config.use_cache = False
        self.layers, self.router = attach_stacked_lora(self.model, FFN_TARGETS, self.batch.slots,
                                                       self.cfg.rank, self.cfg.alpha)
        self.decoder = self.model.get_decoder()
        self.lm_head = self.model.get_output_embeddings()
        if self.cfg.precision == "bf16-mixed":
            _frozen_linears_to_bf16(self.model, self.lm_head)
        params = [p for layer in self.layers.values() for p in (layer.lora_A, layer.lora_B)]
        self.opt = SlotAdamW(params, self.batch.slots, lr=self.cfg.lr, weight_decay=0.0)
        self.warmup = LoraAdapter.load(self.cfg.warmup_adapter) if self.cfg.warmup_adapter else None
        if self.warmup and self.warmup.r != self.cfg.rank:
            raise AdapterError(f"warm-up adapter has rank {self.warmup.r}, training uses rank {self.cfg.rank}")
        self.partners = partners
        if self.cfg.merge_partners:
            if partners is None:
                raise InputError("merge_partners is set: give the trainer its partner adapters (PartnerBank)")
            for name, layer in self.layers.items():
                if name not in partners.weights:
                    raise AdapterError(f"partner adapters have no factors for {name}")
                layer.partner_A, layer.partner_B = partners.weights[name]
        self.counters = {"rounds": 0, "micro_batches": 0, "tokens": 0, "padded_tokens": 0}
        """Totals since construction: rounds, micro-batches, real and padded tokens processed."""

    # -- one document in or out of a slot ---------------------------------------------------
    def plan(self, doc: Document, aug: Augmentation | None) -> DocPlan:
        plan = plan_document(doc, aug, self.tokenizer, self.cfg, self.partners)
        self._teacher(plan)
        return plan

    def _admit(self, slot: int, plan: DocPlan) -> None:
        """Fresh LoRA (seeded init in PEFT's layer order, or the warm-up) and fresh AdamW state."""
        torch.manual_seed(plan.seed)
        for name, layer in self.layers.items():
            layer.reset_slot(slot, self.warmup.weights[name] if self.warmup is not None else None)
        self.opt.reset([slot])

    def _export(self, slot: int, state: _Slot) -> TrainedDocument:
        plan = state.plan
        weights = {name: layer.factors(slot) for name, layer in self.layers.items()}
        stats = {"sequences": len(plan.examples), "steps": len(plan.steps), "tokens": plan.tokens,
                 "final_loss": state.last_loss, "seconds": time.perf_counter() - state.started}
        adapter = LoraAdapter(r=self.cfg.rank, alpha=self.cfg.alpha, weights=weights, base_model=self.model_path)
        adapter.meta = {"train": {**stats, **recipe_meta(self.cfg), "seed": plan.seed,
                                  "init": "warmup" if self.warmup else "random", "trainer": "batched",
                                  "source": plan.source}}
        if self.partners is not None:
            adapter.meta["train"]["partner_adapters"] = self.partners.name
        return TrainedDocument(plan.doc, adapter, stats)

    # -- the loop ------------------------------------------------------------------------------
    def train(self, items: Iterable[tuple[Document, Augmentation | None]],
              on_round: Callable[[dict], None] | None = None) -> Iterator[TrainedDocument]:
        """Train every ``(document, augmentation)``; yields each document as soon as it is done.

        ``items`` is consumed lazily (a document is planned when it enters a slot), so a
        caller can skip documents that became done meanwhile. ``on_round`` gets
        :attr:`counters` after every round.
        """
        pending = iter(items)
        free = list(range(self.batch.slots))
        active: dict[int, _Slot] = {}
        exhausted = False
        self.model.train()
        while True:
            for slot in [s for s, st in active.items() if st.next_step >= len(st.plan.steps)]:
                yield self._export(slot, active.pop(slot))
                free.append(slot)
            while free and not exhausted:
                item = next(pending, None)
                if item is None:
                    exhausted = True
                    break
                plan = self.plan(*item)
                slot = free.pop(0)
                self._admit(slot, plan)
                active[slot] = _Slot(plan=plan, started=time.perf_counter())
            if not active:
                return
            self._round(active)
            if on_round is not None:
                on_round(self.counters)

    def _round(self, active: dict[int, _Slot]) -> None:
        """One optimizer step of every document in ``active``."""
        rows: list[_Row] = []
        targets: dict[int, int] = {}
        active = {slot: st for slot, st in active.items() if st.next_step < len(st.plan.steps)}
        for slot, st in active.items():  # (a document with no sequences to train has no steps)
            idx = st.plan.steps[st.next_step]
            targets[slot] = max(1, sum(st.plan.examples[i].n_targets for i in idx))  # HF's mean denominator
            partners = st.plan.partners[st.next_step] if st.plan.partners else None
            rows += [_Row(slot, st.plan.examples[i], st.plan.teacher.get(i), partners) for i in idx]
        losses = torch.zeros(self.batch.slots, dtype=torch.float64)
        for mb in micro_batches(rows, self.batch.max_batch_tokens, self.batch.max_padding):
            self._forward_backward(mb, targets, losses)
        self.opt.step(list(active))
        self.opt.zero_grad()
        for slot, st in active.items():
            st.next_step += 1
            st.last_loss = float(losses[slot])
        self.counters["rounds"] += 1

    def _pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for n, seq in enumerate(seqs):
            ids[n, :len(seq)] = torch.tensor(seq)
            mask[n, :len(seq)] = 1
        return ids, mask

    def _autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16-mixed")

    @torch.no_grad()
    def _teacher(self, plan: DocPlan) -> None:
        """Top-k next-token log-probabilities of the base model (no LoRA) on each ``kl``
        sequence's teacher prompt, at the positions predicting its targets (computed once)."""
        k = self.cfg.distill_top_k
        for i, ex in enumerate(plan.examples):
            if ex.objective != "kl":
                continue
            ids, mask = self._pad([ex.teacher_ids])
            at = torch.tensor([t - 1 for t in range(1, len(ex.teacher_ids)) if ex.teacher_targets[t]])
            self.router.bypass = True
            try:
                with self._autocast():
                    hidden = self.decoder(input_ids=ids, attention_mask=mask).last_hidden_state[0, at]
                    logp = torch.log_softmax(self.lm_head(hidden).float(), dim=-1)
            finally:
                self.router.bypass = False
            top = logp.topk(min(k, logp.shape[-1]), dim=-1)
            plan.teacher[i] = (top.indices, top.values)

    def _forward_backward(self, rows: list[_Row], targets: dict[int, int], losses: torch.Tensor) -> None:
        """Forward and backward of one micro-batch; gradients accumulate in the stacked LoRAs."""
        ids, mask = self._pad([row.example.input_ids for row in rows])
        slots = torch.tensor([row.slot for row in rows], dtype=torch.long)
        self.router.rows = slots
        self.router.partners = (torch.tensor([row.partners for row in rows], dtype=torch.long)
                                if rows[0].partners else None)
        # position t predicts token t+1. Every real position is projected to the vocabulary, as in
        # PEFT's forward (the same matmul shapes, so the same bits); only positions whose next token
        # is a target carry loss (HF's shifted labels with -100 elsewhere: weight 0)
        tmask = torch.zeros_like(mask, dtype=torch.bool)
        for n, row in enumerate(rows):
            tmask[n, :len(row.example.targets)] = torch.tensor(row.example.targets)
        valid = mask[:, 1:].bool()
        per_row = torch.tensor([1.0 / targets[row.slot] for row in rows]).unsqueeze(1)
        weight = (tmask[:, 1:].float() * per_row)[valid]
        tok_slot = slots.unsqueeze(1).expand_as(valid)[valid]
        labels = ids[:, 1:][valid]
        kl = _kl_targets(rows, self.cfg.distill_top_k)
        try:
            with self._autocast():
                hidden = self.decoder(input_ids=ids, attention_mask=mask).last_hidden_state
                hidden = hidden[:, :-1][valid]  # [T, hidden]
            # the vocabulary projection and loss in chunks: only a chunk's logits are ever in memory
            h = hidden.detach().requires_grad_()
            for c in range(0, h.shape[0], self.batch.loss_chunk_tokens):
                part = slice(c, c + self.batch.loss_chunk_tokens)
                with self._autocast():
                    logits = self.lm_head(h[part]).float()
                    token_loss = torch.nn.functional.cross_entropy(logits, labels[part], reduction="none")
                    if kl is not None and kl[0][part].any():
                        is_kl, t_idx, t_logp = (x[part] for x in kl)
                        token_loss = torch.where(is_kl, topk_kl(logits, t_idx, t_logp), token_loss)
                    weighted = token_loss * weight[part]
                weighted.sum().backward()
                losses.index_add_(0, tok_slot[part], weighted.detach().double())
            if h.grad is not None:
                hidden.backward(h.grad)
        finally:
            self.router.rows = self.router.partners = None
        self.counters["micro_batches"] += 1
        self.counters["tokens"] += int(mask.sum())
        self.counters["padded_tokens"] += ids.numel()


def _kl_targets(rows: list[_Row], k: int):
    """Per real position of the micro-batch (row by row, position t predicting token t+1):
    whether its next token is a ``kl`` target, and the teacher's top-k ids and log-probabilities
    there; None without ``kl`` rows."""
    if all(row.teacher is None for row in rows):
        return None
    n_tokens = sum(len(row.example.input_ids) - 1 for row in rows)
    is_kl = torch.zeros(n_tokens, dtype=torch.bool)
    t_idx = torch.zeros(n_tokens, k, dtype=torch.long)
    t_logp = torch.full((n_tokens, k), -torch.inf)
    pos = 0
    for _, ex, teacher, _ in rows:
        at = [pos + t - 1 for t in range(1, len(ex.input_ids)) if ex.targets[t]]
        if teacher is not None:
            idx, logp = teacher
            is_kl[at] = True
            t_idx[at, :idx.shape[1]] = idx
            t_logp[at, :idx.shape[1]] = logp
        pos += len(ex.input_ids) - 1
    return is_kl, t_idx, t_logp


def topk_kl(logits: torch.Tensor, t_idx: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per row over the teacher's top-k tokens plus one bucket for
    the rest of the vocabulary: exactly 0 when the student's distribution is the teacher's,
    and the full KL when k covers the vocabulary."""
    s_logp = torch.log_softmax(logits.float(), dim=-1)
    s_top = s_logp.gather(1, t_idx)
    p_t = t_logp.exp()
    rest_t = (1 - p_t.sum(1)).clamp_min(1e-12)
    rest_s = (1 - s_top.exp().sum(1)).clamp_min(1e-12)
    top = torch.where(p_t > 0, p_t * (t_logp - s_top), torch.zeros_like(p_t)).sum(1)
    return top + rest_t * (rest_t.log() - rest_s.log())
