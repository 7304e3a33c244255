"""Where the offline work runs (``--executor``): this process, or actors on a Ray cluster.

One module per concept, as vLLM's executors: :mod:`.config` (settings and flags), :mod:`.base`
(the interface), :mod:`.local` (the default), :mod:`.ray_cluster` (the Ray driver side) and
:mod:`.ray_actors` (what runs in Ray's worker processes). Ray is imported only when the Ray
executor is built (``pip install 'prag-vllm[ray]'``).
"""

from __future__ import annotations

from prag_vllm.executors.base import Executor
from prag_vllm.executors.config import EXECUTORS, ExecutorConfig, add_executor_arguments, executor_config_from_args

__all__ = ["EXECUTORS", "Executor", "ExecutorConfig", "add_executor_arguments", "executor_config_from_args",
           "get_executor"]


def get_executor(config: ExecutorConfig) -> Executor:
    """The executor of ``config.kind`` (a Ray executor joins or starts its cluster here)."""
    if config.kind == "ray":
        from prag_vllm.executors.ray_cluster import RayExecutor

        return RayExecutor(config)
    from prag_vllm.executors.local import LocalExecutor

    return LocalExecutor(config)
