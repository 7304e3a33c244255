"""The Ray executor, driver side: actors that each hold one vLLM engine or one batched trainer.

- **Engines** (augmentation, batch answering): :class:`RayEnginePool` has the engine interface;
  each batch the caller makes is split into contiguous parts, one per actor, answered in
  parallel and put back in order. The driver keeps writing the augmentation log and the
  answer file, as in a local run; adapters are passed as paths, so the store (and the merged
  adapters under it) must be a path every node sees.
- **Trainers** (parameterization): the driver lists the documents without a valid adapter,
  cuts them into tasks of ``chunk_documents`` and hands them to trainer actors
  (``ray.util.ActorPool``); each actor stores its adapters itself, atomically.
- **Faults**: actors are created with ``max_restarts`` and ``max_task_retries``: Ray restarts an
  actor whose process died and reruns its task, which skips the documents already stored.

With the batched trainer's defaults (one sequence per step, no padding) every document trains
independently of the others in its batch, so adapters made by any number of actors are the
single-process trainer's, bit for bit (``tests/test_ray_executor.py``).
"""

from __future__ import annotations

import logging
import math
import os
import time

from prag_vllm import logs
from prag_vllm.errors import InputError, PragError
from prag_vllm.executors.base import Executor, check_writable
from prag_vllm.executors.config import ExecutorConfig

logger = logging.getLogger(__name__)

FORWARDED_ENV = ("PRAG_", "VLLM_", "HF_", "TOKENIZERS_", "OMP_", "ONEDNN_")
"""Environment variables (by prefix) the driver passes to every Ray worker."""

OBJECT_STORE_BYTES = 256 * 2**20
"""Object store of a local cluster: tasks carry documents and answers, not tensors."""


def import_ray():
    try:
        import ray
    except ImportError:
        raise InputError("--executor ray needs Ray: pip install 'prag-vllm[ray]'") from None
    return ray


def split(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous (start, end) ranges covering ``range(n)``, sizes differing by at most one."""
    size, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        out.append((start, end))
        start = end
    return out


def one_line(exc: BaseException) -> str:
    """``Type: message`` of an exception (a task's own error for Ray's wrapped ones), first line only."""
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}".rstrip(": ")


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """InputError unless ``host:port`` (``ray://host:port``) accepts a TCP connection; ``auto``
    and addresses without a port are left to Ray."""
    import socket

    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if address == "auto" or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise InputError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}") from None


class RayExecutor(Executor):
    """Joins the cluster at ``config.address``, or starts a local one (stopped by :meth:`close`)."""

    def __init__(self, config: ExecutorConfig):
        super().__init__(config)
        ray = self.ray = import_ray()
        self._owns = False
        if config.address:
            check_reachable(config.address)
        if not ray.is_initialized():
            env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}
            kwargs = {"runtime_env": {"env_vars": env}, "log_to_driver": logs.verbose(),
                      "logging_level": logging.INFO if logs.verbose() else logging.WARNING}
            if config.address:
                kwargs["address"] = config.address
            else:  # a local cluster big enough for the actors asked for (oversubscribed if need be)
                need = config.actors * config.cpus_per_actor
                # workers at the command's own priority (Ray's default lowers them by 15: on a
                # shared machine the actors, which do all the work, then starve behind anything else)
                kwargs.update(num_cpus=max(os.cpu_count() or 1, math.ceil(need)), include_dashboard=False,
                              object_store_memory=OBJECT_STORE_BYTES, _system_config={"worker_niceness": 0})
            logs.step(f"Ray: {'joining ' + config.address if config.address else 'starting a local cluster'}")
            try:
                ray.init(**kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = config.address or "a local cluster"
                raise PragError(f"cannot start Ray ({where}): {one_line(exc)}") from exc
            self._owns = True

    def actor_options(self) -> dict:
        c = self.config
        return {"num_cpus": c.cpus_per_actor, "num_gpus": c.gpus_per_actor, "max_restarts": c.max_retries,
                "max_task_retries": c.max_retries}

    def engine(self, cfg):
        return RayEnginePool(self, cfg)

    def parameterize(self, docs, augmentations, store, model_path, cfg, batch) -> dict:
        from ray.util import ActorPool
        from tqdm.auto import tqdm

        from prag_vllm.executors.ray_actors import TrainerActor
        from prag_vllm.training.driver import pending, remove_stale_temp_dirs, summarize

        check_writable(store.root)
        remove_stale_temp_dirs(store)
        todo, _ = pending(docs, augmentations, store)
        keys = ("trained", "sequences", "steps", "tokens", "padded_tokens", "bytes_written")
        summary = {"trainer": "batched", "executor": "ray", "documents": len(docs), "skipped": len(docs) - len(todo),
                   **dict.fromkeys(keys, 0), "seconds": 0.0}
        if not todo:
            return summarize(summary)
        per = max(1, min(self.config.chunk_documents, math.ceil(len(todo) / self.config.actors)))
        tasks = [todo[i:i + per] for i in range(0, len(todo), per)]
        remote = self.ray.remote(TrainerActor).options(**self.actor_options())
        threads = max(1, int(self.config.cpus_per_actor))
        actors = [remote.remote(str(model_path), cfg, batch, threads) for _ in range(min(self.config.actors, len(tasks)))]
        t0 = time.perf_counter()
        pids = set()

        def submit(actor, task):
            return actor.train.remote(task, {d.id: augmentations[d.id] for d in task if d.id in augmentations},
                                      str(store.root))

        try:
            with tqdm(total=len(todo), desc="parameterize (ray)", unit="doc") as bar:
                for s in ActorPool(actors).map_unordered(submit, tasks):
                    for k in keys:
                        summary[k] += s.get(k) or 0
                    summary["skipped"] += s["skipped"]
                    pids.add(s["pid"])
                    bar.update(s["documents"])
        except self.ray.exceptions.RayError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, PragError):  # the task's own clear error (e.g. a store it cannot write)
                raise type(cause)(str(cause)) from exc
            raise PragError(f"a Ray trainer failed ({self.config.max_retries} retries): {one_line(exc)}") from exc
        finally:
            for a in actors:
                self.ray.kill(a)
        summary["seconds"] = time.perf_counter() - t0
        summary["actors"] = len(actors)
        summary["actor_processes"] = len(pids)
        return summarize(summary)

    def close(self) -> None:
        if self._owns and self.ray.is_initialized():
            self.ray.shutdown()
            self._owns = False


class RayEnginePool:
    """The engine interface over ``config.actors`` engine actors (:class:`~.ray_actors.EngineActor`)."""

    def __init__(self, executor: RayExecutor, cfg):
        from prag_vllm.executors.ray_actors import EngineActor

        self.ray, self.cfg = executor.ray, cfg
        remote = self.ray.remote(EngineActor).options(**executor.actor_options())
        logs.step(f"starting {executor.config.actors} vLLM engine actors ({os.path.basename(cfg.model)}, "
                  f"dtype {cfg.dtype})")
        t0 = time.perf_counter()
        self.actors = [remote.remote(cfg) for _ in range(executor.config.actors)]
        try:
            self.ray.get([a.pid.remote() for a in self.actors])
        except self.ray.exceptions.RayError as exc:
            self.close()
            raise PragError(f"a vLLM engine actor failed to start: {one_line(exc)}") from exc
        logs.step(f"engine actors ready in {time.perf_counter() - t0:.0f} s")
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.cfg.model)
        return self._tokenizer

    def generate(self, conversations: list[list[dict]], adapters: list | None = None, **kwargs) -> list:
        """:meth:`VLLMEngine.generate <prag_vllm.generate.VLLMEngine.generate>`, the batch split over the actors."""
        if adapters is not None and len(adapters) != len(conversations):
            raise ValueError("one adapter entry (path or None) per conversation is required")
        refs = []
        for actor, (start, end) in zip(self.actors, split(len(conversations), len(self.actors))):
            if end > start:
                part = None if adapters is None else [None if a is None else str(a) for a in adapters[start:end]]
                refs.append(actor.generate.remote(conversations[start:end], part, kwargs))
        return [g for gens in self.ray.get(refs) for g in gens]

    def chat(self, conversations: list[list[dict]], *, max_tokens: int, temperature: float = 0.0,
             seed: int | None = None) -> list[str]:
        """The :class:`prag_vllm.augment.ChatGenerator` interface (no adapters)."""
        return [g.text for g in self.generate(conversations, max_tokens=max_tokens, temperature=temperature,
                                              seed=seed)]

    def close(self) -> None:
        for a in self.actors:
            try:
                self.ray.get(a.close.remote(), timeout=60)
            except Exception:  # noqa: BLE001 -- a dead or stuck actor is killed below either way
                logger.warning("engine actor did not close cleanly", exc_info=True)
            self.ray.kill(a)
        self.actors = []

    def __enter__(self) -> RayEnginePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
