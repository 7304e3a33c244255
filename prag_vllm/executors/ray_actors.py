"""What runs inside Ray's worker processes: one vLLM engine, or one batched trainer, per actor.

Plain classes, wrapped with ``ray.remote`` by the driver (:mod:`.ray_cluster`), so that this
module imports without Ray. Their process title is ``ray::EngineActor...`` /
``ray::TrainerActor...``. A trainer actor writes each adapter into the shared store itself,
atomically (a temporary directory renamed into place), so a killed actor leaves at most an
invisible temporary directory, which the next run removes.
"""

from __future__ import annotations

import os


class EngineActor:
    """One :class:`~prag_vllm.generate.VLLMEngine`."""

    def __init__(self, cfg) -> None:
        from prag_vllm.generate import VLLMEngine

        self.engine = VLLMEngine(cfg)

    def pid(self) -> int:
        return os.getpid()

    def generate(self, conversations: list, adapters: list | None, kwargs: dict) -> list:
        return self.engine.generate(conversations, adapters, **kwargs)

    def close(self) -> None:
        self.engine.close()


class TrainerActor:
    """One :class:`~prag_vllm.training.trainer.BatchedTrainer`, kept between tasks (the model
    is loaded once per actor)."""

    def __init__(self, model_path: str, cfg, batch, threads: int) -> None:
        import torch

        from prag_vllm.training.trainer import BatchedTrainer

        torch.set_num_threads(max(1, threads))
        self.model_path, self.cfg, self.batch = model_path, cfg, batch
        self.trainer = BatchedTrainer(model_path, cfg, batch)

    def pid(self) -> int:
        return os.getpid()

    def train(self, docs: list, augmentations: dict, store_root: str) -> dict:
        """Train and store the documents of one task that have no valid adapter yet; a task
        retried after a crash skips those the dead actor already stored."""
        from prag_vllm.adapters import AdapterStore
        from prag_vllm.executors.base import check_writable
        from prag_vllm.training.driver import parameterize_batched

        check_writable(store_root)
        summary = parameterize_batched(docs, augmentations, AdapterStore(store_root), self.model_path, self.cfg,
                                       self.batch, trainer=self.trainer, progress=False)
        return dict(summary, pid=os.getpid())
