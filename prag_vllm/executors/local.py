"""The local executor: one engine or one batched trainer in this process (the default)."""

from __future__ import annotations

from prag_vllm.executors.base import Executor


class LocalExecutor(Executor):
    def engine(self, cfg):
        from prag_vllm.cliargs import start_engine

        return start_engine(cfg)

    def parameterize(self, docs, augmentations, store, model_path, cfg, batch) -> dict:
        from prag_vllm.training.driver import parameterize_batched

        return parameterize_batched(docs, augmentations, store, model_path, cfg, batch)
