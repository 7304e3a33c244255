"""Where offline work runs: the executor settings and their command-line flags."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from prag_vllm.cliargs import non_negative, positive
from prag_vllm.errors import InputError

EXECUTORS = ("local", "ray")


@dataclass
class ExecutorConfig:
    """Settings of the executor that runs ``prag augment``, ``prag parameterize`` and ``prag answer``."""

    kind: str = "local"
    """``local``: this process (one vLLM engine or one trainer; the default). ``ray``: actors on
    a Ray cluster, each holding one vLLM engine or one batched trainer (``pip install
    'prag-vllm[ray]'``; docs/scale_out.md)."""
    address: str | None = None
    """Ray cluster to join (``ray.init(address)``: ``auto``, ``ray://head:10001``, ``head:6379``).
    None: start a local Ray cluster in this process, stopped at the end."""
    actors: int = 2
    """Actors started (engines for augmentation and answering, trainers for parameterization)."""
    cpus_per_actor: float = 1.0
    """CPUs Ray reserves for each actor; a trainer actor also uses this many torch threads
    (at least one)."""
    gpus_per_actor: float = 0.0
    """GPUs Ray reserves for each actor (on a GPU cluster: 1 for one vLLM engine per GPU). The
    batched trainer runs on CPU in this release: leave it 0 for parameterization."""
    max_retries: int = 3
    """How often Ray restarts an actor whose process died and retries its task; a retried task
    skips the documents the dead actor already stored."""
    chunk_documents: int = 32
    """Documents per parameterization task (a trainer actor fills its slots from one task)."""

    def __post_init__(self) -> None:
        if self.kind not in EXECUTORS:
            raise InputError(f"unknown executor {self.kind!r}; choose from {', '.join(EXECUTORS)}")
        if self.actors < 1 or self.chunk_documents < 1:
            raise InputError("the executor needs at least one actor and one document per task")
        if self.cpus_per_actor < 0 or self.gpus_per_actor < 0 or self.max_retries < 0:
            raise InputError("CPUs and GPUs per actor and retries must not be negative")
        if self.kind == "local" and self.address is not None:
            raise InputError("--ray-address needs --executor ray")


def add_executor_arguments(sp: argparse.ArgumentParser, trains: bool = False) -> None:
    """``--executor`` and the Ray flags (``trains``: also ``--chunk-documents``)."""
    d = ExecutorConfig()
    g = sp.add_argument_group("executor (docs/scale_out.md)")
    g.add_argument("--executor", choices=EXECUTORS, default=d.kind,
                   help="local: this process (default); ray: actors on a Ray cluster (pip install 'prag-vllm[ray]')")
    g.add_argument("--ray-address", default=None, metavar="ADDRESS",
                   help="Ray cluster to join (e.g. auto or ray://head:10001; default: a local cluster)")
    g.add_argument("--actors", type=positive, default=d.actors, help=f"Ray actors (default {d.actors})")
    g.add_argument("--cpus-per-actor", type=non_negative, default=d.cpus_per_actor)
    g.add_argument("--gpus-per-actor", type=non_negative, default=d.gpus_per_actor)
    g.add_argument("--max-retries", type=int, default=d.max_retries,
                   help="restarts of a dead actor and retries of its task")
    if trains:
        g.add_argument("--chunk-documents", type=positive, default=d.chunk_documents,
                       help="documents per parameterization task")


def executor_config_from_args(args: argparse.Namespace) -> ExecutorConfig:
    return ExecutorConfig(kind=args.executor, address=args.ray_address, actors=args.actors,
                          cpus_per_actor=args.cpus_per_actor, gpus_per_actor=args.gpus_per_actor,
                          max_retries=args.max_retries,
                          chunk_documents=getattr(args, "chunk_documents", ExecutorConfig.chunk_documents))
