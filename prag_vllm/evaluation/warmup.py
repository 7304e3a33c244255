"""Warm-up LoRA initialization (the paper's Table 2 ablation): one LoRA trained on QA pairs.

Source of the pairs (no leakage): questions of the evaluated datasets that are NOT
evaluated (file order, taken round-robin across datasets), or the questions of a separate
file (``--warmup-data``) minus any evaluated question. This follows the paper's "direct"
warm-up data (the dataset's later questions, question -> answer, no passages). Each pair
becomes the chat turn used at inference and in per-document training
(``question_prompt(question)`` -> first gold answer). The LoRA starts random (fixed seed)
and is trained ``epochs`` times over the pairs (AdamW, the per-document settings); it is
then every document's starting point (``TrainConfig.warmup_adapter``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path

from prag_vllm.adapters import META_FILE
from prag_vllm.metrics import normalize_answer
from prag_vllm.modes import question_prompt
from prag_vllm.parameterize import TrainConfig
from prag_vllm.pipeline import Question

logger = logging.getLogger(__name__)
WARMUP_SEED = 1234


def warmup_pairs(pools: list[list[Question]], evaluated: list[Question], size: int) -> list[tuple[str, str]]:
    """Up to ``size`` (question, answer) pairs, round-robin over ``pools`` (each pool already
    without its dataset's evaluated questions); a question whose text equals an evaluated one
    (after normalization) is left out too."""
    banned = {normalize_answer(q.question) for q in evaluated}
    queues = [[q for q in pool if q.answers and normalize_answer(q.question) not in banned] for pool in pools]
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    for i in range(max((len(q) for q in queues), default=0)):
        for queue in queues:
            if i < len(queue) and len(pairs) < size and queue[i].question not in seen:
                seen.add(queue[i].question)
                pairs.append((queue[i].question, queue[i].answers[0]))
    return pairs


def warmup_key(pairs: list[tuple[str, str]], cfg: TrainConfig, epochs: int, model_name: str) -> str:
    blob = json.dumps({"pairs": pairs, "model": model_name, "epochs": epochs, "rank": cfg.rank, "alpha": cfg.alpha,
                       "lr": cfg.lr, "batch_size": cfg.batch_size, "max_length": cfg.max_length,
                       "precision": cfg.precision, "seed": WARMUP_SEED}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def train_warmup_adapter(pairs: list[tuple[str, str]], model_path: str | os.PathLike, cfg: TrainConfig,
                         out_dir: str | os.PathLike, epochs: int = 1) -> dict:
    """Train the warm-up LoRA into ``out_dir`` (a PEFT directory) unless it is already there."""
    import torch
    from tqdm.auto import tqdm

    from prag_vllm.parameterize import DocumentTrainer

    out_dir = Path(out_dir)
    if (out_dir / META_FILE).is_file():
        logger.info("warm-up adapter already trained: %s", out_dir)
        return {"pairs": len(pairs), "trained": False, "seconds": 0.0, "path": str(out_dir)}
    t0 = time.perf_counter()
    trainer = DocumentTrainer(model_path, replace(cfg, warmup_adapter=None, epochs=epochs, recipe="default"))
    tok = trainer.tokenizer
    torch.manual_seed(WARMUP_SEED)
    with torch.no_grad():
        for layer in trainer.lora_layers.values():
            layer.reset_lora_parameters("default", True)
    texts = [tok.apply_chat_template([{"role": "user", "content": question_prompt(q)},
                                      {"role": "assistant", "content": a}], tokenize=False) for q, a in pairs]
    enc = [tok(t, truncation=True, max_length=cfg.max_length)["input_ids"] for t in texts]
    params = [p for layer in trainer.lora_layers.values()
              for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight)]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(WARMUP_SEED)
    trainer.model.train()
    tokens, loss_v = 0, float("nan")
    steps = epochs * ((len(enc) + cfg.batch_size - 1) // cfg.batch_size)
    with tqdm(total=steps, desc="warm-up LoRA", unit="step") as bar:
        for _ in range(epochs):
            order = torch.randperm(len(enc), generator=gen).tolist()
            for s in range(0, len(order), cfg.batch_size):
                batch = [enc[i] for i in order[s:s + cfg.batch_size]]
                width = max(map(len, batch))
                ids = torch.full((len(batch), width), tok.pad_token_id)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, seq in enumerate(batch):
                    ids[row, :len(seq)] = torch.tensor(seq)
                    mask[row, :len(seq)] = 1
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16-mixed"):
                    loss = trainer.model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                tokens += int(mask.sum())
                loss_v = float(loss.detach())
                bar.update(1)
    adapter = trainer.export()
    seconds = time.perf_counter() - t0
    adapter.meta = {"kind": "warmup", "pairs": len(pairs), "epochs": epochs, "tokens": tokens,
                    "final_loss": loss_v, "seconds": round(seconds, 2)}
    adapter.save(out_dir)
    logger.info("warm-up LoRA: %d pairs, %d epoch(s), %.0f s, final loss %.3f -> %s",
                len(pairs), epochs, seconds, loss_v, out_dir)
    return {"pairs": len(pairs), "trained": True, "seconds": seconds, "tokens": tokens, "path": str(out_dir)}
