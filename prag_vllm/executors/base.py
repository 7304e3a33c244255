"""The executor interface: where augmentation, parameterization and batch answering run."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from prag_vllm.errors import InputError
from prag_vllm.executors.config import ExecutorConfig

if TYPE_CHECKING:
    from prag_vllm.adapters import AdapterStore
    from prag_vllm.augment import Augmentation
    from prag_vllm.corpus import Document
    from prag_vllm.generate import EngineConfig
    from prag_vllm.parameterize import TrainConfig
    from prag_vllm.training.trainer import BatchConfig


def check_writable(root: str | os.PathLike) -> None:
    """InputError unless this process can create files under the store ``root`` (the driver checks
    before any work; each trainer actor checks again on its node)."""
    import tempfile
    from pathlib import Path

    docs = Path(root) / "docs"
    try:
        docs.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=docs).close()
    except OSError as exc:
        raise InputError(f"the adapter store {root} is not writable here: {exc.strerror or exc}") from None


class Executor(ABC):
    """Runs the offline work. Subclasses: :class:`~prag_vllm.executors.local.LocalExecutor` (this
    process) and :class:`~prag_vllm.executors.ray_cluster.RayExecutor` (actors on a Ray cluster).
    Both write the same files: adapters into the same :class:`~prag_vllm.adapters.AdapterStore`
    (atomically, by whoever trained them), augmentations into the same log."""

    def __init__(self, config: ExecutorConfig):
        self.config = config

    @abstractmethod
    def engine(self, cfg: EngineConfig):
        """A started engine with :class:`~prag_vllm.generate.VLLMEngine`'s ``generate``, ``chat``,
        ``tokenizer`` and ``close`` (also a context manager)."""

    @abstractmethod
    def parameterize(self, docs: list[Document], augmentations: dict[str, Augmentation], store: AdapterStore,
                     model_path: str | os.PathLike, cfg: TrainConfig, batch: BatchConfig) -> dict:
        """Train and store an adapter for every document without a valid one (resumable, batched
        trainer); returns the run's summary (:func:`~prag_vllm.training.driver.summarize`)."""

    def close(self) -> None:  # noqa: B027 -- optional: the local executor starts nothing
        """Release what the executor started."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
