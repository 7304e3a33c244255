"""Parametric document encoding: one rank-2 FFN LoRA per document (PEFT, AdamW).

Training sequences are ``passage-or-rewrite ⊕ question ⊕ answer`` (the question/answer
turn in the model's chat format, worded as at inference), with next-token loss on every
token. Each document starts from a fresh LoRA (random init seeded by its id, or a
warm-up adapter) and a fresh optimizer, so its adapter does not depend on which other
documents were trained before it. Finished adapters are skipped on re-runs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from prag_vllm.adapters import FFN_TARGETS, AdapterStore, LoraAdapter
from prag_vllm.augment import Augmentation
from prag_vllm.corpus import Document
from prag_vllm.modes import question_prompt

logger = logging.getLogger(__name__)
PEFT_MODULE_PREFIX = "base_model.model."


@dataclass
class TrainConfig:
    """Per-document LoRA training hyper-parameters (paper defaults unless noted)."""

    rank: int = 2
    """LoRA rank r."""
    alpha: float = 32.0
    """LoRA alpha (update scaled by alpha / r)."""
    lr: float = 3e-4
    """AdamW learning rate."""
    epochs: int = 3
    """Passes over a document's sequences. Measured (README 'Choosing epochs'): 1 epoch
    learns clearly less than 3; 10 learns no more than 3 and costs 3.3x the time."""
    batch_size: int = 1
    """Sequences per optimizer step (the paper uses 1)."""
    max_length: int = 512
    """Tokens per training sequence (longer ones are truncated)."""
    seed: int = 0
    """Base seed; combined with the document id for init and shuffling."""
    warmup_adapter: str | None = None
    """PEFT adapter directory to initialise every document's LoRA from (warm-up init)."""
    precision: str = "bf16-mixed"
    """``bf16-mixed`` (bf16 autocast, fp32 LoRA weights and optimizer; 1.5x faster on
    this CPU at batch 1) or ``float32`` (exact; used by the equivalence tests)."""


def training_texts(doc: Document, aug: Augmentation | None, tokenizer) -> list[str]:
    """The document's training sequences: each passage variant ⊕ each QA turn."""
    passages = [doc.passage] + (list(aug.rewrites) if aug else [])
    qa = list(aug.qa) if aug else []
    if not qa:
        return passages
    texts = []
    for p in passages:
        for pair in qa:
            turn = tokenizer.apply_chat_template(
                [{"role": "user", "content": question_prompt(pair["question"])},
                 {"role": "assistant", "content": pair["answer"]}], tokenize=False)
            texts.append(f"{p}\n\n{turn}")
    return texts


def _doc_seed(base: int, doc_id: str) -> int:
    return base + int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:4], "little")


class DocumentTrainer:
    """Holds one base model with a PEFT LoRA and trains it afresh per document."""

    def __init__(self, model_path: str | os.PathLike, cfg: TrainConfig | None = None, model=None, tokenizer=None):
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg or TrainConfig()
        if self.cfg.precision not in ("bf16-mixed", "float32"):
            from prag_vllm.errors import InputError
            raise InputError(f"unknown training precision {self.cfg.precision!r} (bf16-mixed or float32)")
        self.model_path = str(model_path)
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(self.model_path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        base = model or AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32)
        base.config.use_cache = False
        lora_cfg = LoraConfig(r=self.cfg.rank, lora_alpha=self.cfg.alpha, lora_dropout=0.0,
                              target_modules=list(FFN_TARGETS), bias="none", task_type="CAUSAL_LM")
        self.model = get_peft_model(base, lora_cfg)
        self.lora_layers = {name.removeprefix(PEFT_MODULE_PREFIX): mod for name, mod in self.model.named_modules()
                            if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {})}
        self.warmup = LoraAdapter.load(self.cfg.warmup_adapter) if self.cfg.warmup_adapter else None
        if self.warmup and self.warmup.r != self.cfg.rank:
            from prag_vllm.errors import AdapterError
            raise AdapterError(f"warm-up adapter has rank {self.warmup.r}, training uses rank {self.cfg.rank}")

    def _reset(self, seed: int) -> None:
        import torch

        torch.manual_seed(seed)
        with torch.no_grad():
            for name, layer in self.lora_layers.items():
                if self.warmup is not None:
                    a, b = self.warmup.weights[name]
                    layer.lora_A["default"].weight.copy_(a.float())
                    layer.lora_B["default"].weight.copy_(b.float())
                else:
                    layer.reset_lora_parameters("default", True)

    def export(self) -> LoraAdapter:
        weights = {name: (layer.lora_A["default"].weight.detach().clone(),
                          layer.lora_B["default"].weight.detach().clone())
                   for name, layer in self.lora_layers.items()}
        return LoraAdapter(r=self.cfg.rank, alpha=self.cfg.alpha, weights=weights, base_model=self.model_path)

    def train(self, doc: Document, aug: Augmentation | None) -> tuple[LoraAdapter, dict]:
        """Train a fresh LoRA on one document; returns it and training stats."""
        import torch

        seed = _doc_seed(self.cfg.seed, doc.id)
        self._reset(seed)
        params = [p for layer in self.lora_layers.values()
                  for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight)]
        opt = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=0.0)
        enc = [self.tokenizer(t, truncation=True, max_length=self.cfg.max_length)["input_ids"]
               for t in training_texts(doc, aug, self.tokenizer)]
        gen = torch.Generator().manual_seed(seed)
        self.model.train()
        tokens, steps, loss_v, t0 = 0, 0, float("nan"), time.perf_counter()
        for _ in range(self.cfg.epochs):
            order = torch.randperm(len(enc), generator=gen).tolist()
            for s in range(0, len(order), self.cfg.batch_size):
                batch = [enc[i] for i in order[s:s + self.cfg.batch_size]]
                width = max(map(len, batch))
                ids = torch.full((len(batch), width), self.tokenizer.pad_token_id)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, seq in enumerate(batch):
                    ids[row, :len(seq)] = torch.tensor(seq)
                    mask[row, :len(seq)] = 1
                labels = ids.masked_fill(mask == 0, -100)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16-mixed"):
                    loss = self.model(input_ids=ids, attention_mask=mask, labels=labels).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                tokens += int(mask.sum())
                steps += 1
                loss_v = float(loss.detach())
        stats = {"sequences": len(enc), "steps": steps, "tokens": tokens, "final_loss": loss_v,
                 "seconds": time.perf_counter() - t0}
        adapter = self.export()
        adapter.meta = {"train": {**stats, "epochs": self.cfg.epochs, "lr": self.cfg.lr, "seed": seed,
                                  "init": "warmup" if self.warmup else "random"}}
        return adapter, stats


def parameterize_corpus(docs: list[Document], augmentations: dict[str, Augmentation], store: AdapterStore,
                        model_path: str | os.PathLike, cfg: TrainConfig | None = None,
                        trainer: DocumentTrainer | None = None) -> dict:
    """Train and store an adapter for every document that has none yet (resumable)."""
    from tqdm.auto import tqdm

    todo = [d for d in docs if not store.has(d.id)]
    summary = {"documents": len(docs), "skipped": len(docs) - len(todo), "trained": 0, "tokens": 0, "seconds": 0.0}
    if len(todo) < len(docs):
        logger.info("parameterize: %d of %d documents already have adapters, skipping them",
                    summary["skipped"], len(docs))
    if not todo:
        return summary
    trainer = trainer or DocumentTrainer(model_path, cfg)
    t0 = time.perf_counter()
    for doc in tqdm(todo, desc="parameterize", unit="doc"):
        adapter, stats = trainer.train(doc, augmentations.get(doc.id))
        store.save(doc.id, adapter)
        summary["trained"] += 1
        summary["tokens"] += stats["tokens"]
    summary["seconds"] = time.perf_counter() - t0
    return summary


def store_dir_size(path: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
