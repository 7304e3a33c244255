"""Parametric document encoding: one rank-2 FFN LoRA per document (PEFT, AdamW).

What a document trains on, and which tokens carry loss, is its *recipe*
(:mod:`prag_vllm.recipes`: ``default``, ``paper``, ``distill``). Each document
starts from a fresh LoRA (random init seeded by its id -- or by the base seed alone for
a recipe with a shared init -- or a warm-up adapter) and a fresh optimizer, so its
adapter does not depend on which other documents were trained before it. Finished
adapters are skipped on re-runs. :class:`DocumentTrainer` is the one-document PEFT
reference; :mod:`prag_vllm.training.trainer` trains many documents at once, equally.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass

from prag_vllm.adapters import FFN_TARGETS, AdapterStore, LoraAdapter
from prag_vllm.augment import Augmentation
from prag_vllm.corpus import Document
from prag_vllm.errors import InputError
from prag_vllm.recipes import Recipe, get_recipe
from prag_vllm.sequences import Example, check_loss_policy

logger = logging.getLogger(__name__)
PEFT_MODULE_PREFIX = "base_model.model."


@dataclass
class TrainConfig:
    """Per-document LoRA training hyper-parameters (paper defaults unless noted).

    ``epochs``, ``lr`` and ``loss_policy`` left None take the recipe's values."""

    recipe: str = "default"
    """Training recipe (``default``, ``paper``, ``distill``; see recipes.py)."""
    loss_policy: str | None = None
    """``full``, ``content`` or ``answer`` (which tokens carry loss); None: the recipe's."""
    rank: int = 2
    """LoRA rank r."""
    alpha: float = 32.0
    """LoRA alpha (update scaled by alpha / r)."""
    lr: float | None = None
    """AdamW learning rate; None: the recipe's (3e-4 for every recipe, as the paper)."""
    epochs: int | None = None
    """Passes over a document's sequences; None: the recipe's (docs/recipes.md)."""
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
    distill_top_k: int = 32
    """``distill``: teacher probabilities kept per answer token (the rest as one bucket)."""
    merge_partners: int = 0
    """Merge-aware training (batched trainer): every step merges this many other documents'
    frozen adapters into the document's own and adds one QA pair of each
    (:mod:`prag_vllm.training.partners`). 0: off, each adapter trains alone."""
    partner_adapters: str | None = None
    """``merge_partners``: the adapter set (a store directory) the partners come from. None: the
    set of the same settings without partners, beside the one being trained (trained first
    where it lacks documents)."""

    def __post_init__(self) -> None:
        recipe = get_recipe(self.recipe)
        if self.loss_policy is None:
            self.loss_policy = recipe.loss_policy
        check_loss_policy(self.loss_policy)
        if self.epochs is None:
            self.epochs = recipe.epochs
        if self.lr is None:
            self.lr = recipe.lr
        if self.precision not in ("bf16-mixed", "float32"):
            raise InputError(f"unknown training precision {self.precision!r} (bf16-mixed or float32)")
        for name in ("rank", "epochs", "batch_size", "max_length", "distill_top_k"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.lr >= 0:
            raise InputError(f"lr must not be negative, got {self.lr}")
        if not isinstance(self.merge_partners, int) or self.merge_partners < 0:
            raise InputError(f"merge_partners must be a non-negative integer, got {self.merge_partners!r}")

    @property
    def spec(self) -> Recipe:
        return get_recipe(self.recipe)


def training_examples(doc: Document, aug: Augmentation | None, tokenizer, cfg: TrainConfig) -> list[Example]:
    """The document's training sequences under ``cfg``'s recipe and loss policy."""
    return cfg.spec.examples(doc, aug, tokenizer, policy=cfg.loss_policy, max_length=cfg.max_length)


def source_digest(doc: Document, aug: Augmentation | None) -> str:
    """sha256 of what a document's adapter is trained from (its text and its augmentation): an
    adapter whose recorded digest differs is stale and is trained again (``AdapterStore.has``)."""
    src = {"title": doc.title, "text": doc.text, "rewrites": list(aug.rewrites) if aug else [],
           "qa": [[qa.get("question"), qa.get("answer")] for qa in aug.qa] if aug else []}
    return hashlib.sha256(json.dumps(src, sort_keys=True).encode()).hexdigest()[:16]


def _doc_seed(base: int, doc_id: str) -> int:
    return base + int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:4], "little")


def init_seed(cfg: TrainConfig, doc_id: str) -> int:
    """Seed of a document's LoRA init: shared by all documents when the recipe says so."""
    return cfg.seed if cfg.spec.shared_init else _doc_seed(cfg.seed, doc_id)


def step_order(cfg: TrainConfig, n: int, doc_id: str) -> list[list[int]]:
    """Per optimizer step, the indices of the sequences it trains on (all epochs)."""
    import torch

    gen = torch.Generator().manual_seed(_doc_seed(cfg.seed, doc_id))
    steps = []
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=gen).tolist() if cfg.spec.shuffle else list(range(n))
        steps += [order[i:i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]
    return steps


def labels_for(ex: Example) -> list[int]:
    """HF-style labels: the token id where it is a target, -100 elsewhere."""
    return [t if m else -100 for t, m in zip(ex.input_ids, ex.targets)]


class DocumentTrainer:
    """Holds one base model with a PEFT LoRA and trains it afresh per document."""

    def __init__(self, model_path: str | os.PathLike, cfg: TrainConfig | None = None, model=None, tokenizer=None):
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg or TrainConfig()
        if self.cfg.spec.distill:
            raise InputError(f"recipe {self.cfg.recipe!r} needs a teacher: train it with the batched trainer")
        if self.cfg.merge_partners:
            raise InputError("merge-aware training (merge_partners) runs in the batched trainer only")
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

        seed = init_seed(self.cfg, doc.id)
        self._reset(seed)
        params = [p for layer in self.lora_layers.values()
                  for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight)]
        opt = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=0.0)
        examples = training_examples(doc, aug, self.tokenizer, self.cfg)
        self.model.train()
        tokens, steps, loss_v, t0 = 0, 0, float("nan"), time.perf_counter()
        for step in step_order(self.cfg, len(examples), doc.id):
            batch = [examples[i] for i in step]
            width = max(len(ex.input_ids) for ex in batch)
            ids = torch.full((len(batch), width), self.tokenizer.pad_token_id)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            labels = torch.full((len(batch), width), -100)
            for row, ex in enumerate(batch):
                ids[row, :len(ex.input_ids)] = torch.tensor(ex.input_ids)
                mask[row, :len(ex.input_ids)] = 1
                labels[row, :len(ex.input_ids)] = torch.tensor(labels_for(ex))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16-mixed"):
                loss = self.model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            tokens += int(mask.sum())
            steps += 1
            loss_v = float(loss.detach())
        stats = {"sequences": len(examples), "steps": steps, "tokens": tokens, "final_loss": loss_v,
                 "seconds": time.perf_counter() - t0}
        adapter = self.export()
        adapter.meta = {"train": {**stats, **recipe_meta(self.cfg), "seed": seed,
                                  "init": "warmup" if self.warmup else "random",
                                  "source": source_digest(doc, aug)}}
        return adapter, stats


def recipe_meta(cfg: TrainConfig) -> dict:
    """What an adapter's metadata records of how it was trained."""
    meta = {"recipe": cfg.recipe, "loss_policy": cfg.loss_policy, "epochs": cfg.epochs, "lr": cfg.lr}
    if cfg.merge_partners:  # the partner set's name is added by the trainer that loaded it
        meta["merge_partners"] = cfg.merge_partners
    return meta


def parameterize_corpus(docs: list[Document], augmentations: dict[str, Augmentation], store: AdapterStore,
                        model_path: str | os.PathLike, cfg: TrainConfig | None = None,
                        trainer: DocumentTrainer | None = None) -> dict:
    """Train and store an adapter for every document that has none yet (resumable)."""
    from tqdm.auto import tqdm

    todo = [d for d in docs if not store.has(d.id, source=source_digest(d, augmentations.get(d.id)))]
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

