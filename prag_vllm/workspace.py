"""Where a run keeps its artefacts: index, augmentations, adapters and answers."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from prag_vllm.adapters import AdapterStore


@dataclass(frozen=True)
class Workspace:
    """A directory holding everything one corpus produces (safe to resume into)."""

    root: Path
    """Workspace directory (created on demand)."""

    @classmethod
    def at(cls, path: str | os.PathLike) -> Workspace:
        return cls(Path(path).expanduser())

    @property
    def index_dir(self) -> Path:
        return self.root / "index"

    @property
    def augmented(self) -> Path:
        return self.root / "augmented.jsonl"

    def store(self, model_path: str | os.PathLike) -> AdapterStore:
        """Adapters are per base model: ``adapters/<model directory name>/``."""
        return AdapterStore(self.root / "adapters" / Path(model_path).name)
