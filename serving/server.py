"""Assemble the server from a :class:`ServerConfig`: corpus, index, adapter store, vLLM, app.

``python -m serving`` (or ``prag serve``) runs :func:`main`. Validation of the
configuration and inputs happens before vLLM starts, so bad input fails in a second
with one line, not after the engine's 40 s start.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from prag_vllm.errors import PragError
from serving.config import ServerConfig, add_arguments, config_from_args, retriever_config

logger = logging.getLogger(__name__)


def _demo_corpus(work_dir: Path) -> Path:
    """The invented demo corpus, written into the workspace (as ``prag demo`` does)."""
    from prag_vllm.demo_data import DOCUMENTS
    from prag_vllm.fileio import atomic_write_text

    path = work_dir / "corpus.jsonl"
    if not path.is_file():
        work_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, "".join(json.dumps(d) + "\n" for d in DOCUMENTS))
    return path


class Server:
    """Everything a running server owns; :meth:`build_service` starts vLLM."""

    def __init__(self, cfg: ServerConfig):
        from transformers import AutoConfig

        from prag_vllm.adapters import AdapterStore, model_identity
        from prag_vllm.augment import load_augmentations
        from prag_vllm.corpus import load_corpus
        from prag_vllm.ffn import ffn_shapes
        from prag_vllm.models import DEFAULT_MODEL, resolve_model
        from prag_vllm.retrieve import build_retriever
        from prag_vllm.workspace import Workspace

        self.cfg = cfg
        ws = Workspace.at(cfg.work_dir)
        corpus = Path(cfg.corpus) if cfg.corpus else _demo_corpus(ws.root)
        docs = load_corpus(corpus)
        self.model_path = Path(resolve_model(cfg.model or DEFAULT_MODEL))
        self.ffn_shapes = ffn_shapes(AutoConfig.from_pretrained(self.model_path))  # an unsupported model fails here
        self.store = AdapterStore(cfg.adapter_store) if cfg.adapter_store else ws.store(self.model_path)
        # the embedded index is a local cache (built or reused); an Elasticsearch index is
        # shared and written only by `prag index`: the server opens it read-only
        self.retriever = build_retriever(retriever_config(cfg, ws.index_dir), docs, update_index=False)
        self.model_id = model_identity(self.model_path)
        self.augmentations = load_augmentations(ws.augmented) if ws.augmented.is_file() else {}
        self.adapter_doc_ids = [d.id for d in docs if self.store.has(d.id)]
        logger.info("corpus %s: %d documents, %d with an adapter in %s", corpus, len(docs),
                    len(self.adapter_doc_ids), self.store.root)
        if cfg.cache_dir:
            self.cache_root = Path(cfg.cache_dir)
            self._tmp = None
        else:
            base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
            self._tmp = tempfile.TemporaryDirectory(prefix="prag-merged-", dir=base)
            self.cache_root = Path(self._tmp.name)
        self.engine = None

    def build_service(self):
        """Start vLLM and wire the service (called by the app at startup)."""
        import asyncio

        from transformers import AutoTokenizer

        from prag_vllm.generate import EngineConfig
        from serving.adapters.doc_cache import DocAdapterCache
        from serving.adapters.merged_cache import MergedAdapterLRU
        from serving.adapters.preload import preload
        from serving.engine import AsyncEngine
        from serving.metrics import ServerMetrics
        from serving.service import RAGService

        cfg = self.cfg
        self.engine = AsyncEngine(EngineConfig(model=str(self.model_path), dtype=cfg.dtype,
                                               max_model_len=cfg.max_model_len, max_lora_rank=cfg.max_lora_rank,
                                               max_loras=cfg.max_loras, max_num_seqs=cfg.max_num_seqs,
                                               enable_lora=bool(cfg.enable_lora),
                                               extra={"max_cpu_loras": cfg.max_cpu_loras,
                                                      "enable_prefix_caching": bool(cfg.enable_prefix_caching)}))
        self.engine.start()
        loop = asyncio.get_running_loop()
        self._warm_up = loop.create_task(self.engine.warm_up())  # in the background (a few seconds)

        def unload(entry) -> None:
            loop.create_task(self.engine.unload_adapter(entry.lora_id))

        worker_merge = bool(cfg.worker_merge) and self.engine.plugin_active
        docs = DocAdapterCache(self.store, self.ffn_shapes, cfg.max_lora_rank, max_bytes=cfg.doc_cache_max_bytes,
                               model_id=self.model_id, keep_tensors=not worker_merge)
        if cfg.preload_adapters and cfg.enable_lora:
            def to_worker(adapters) -> tuple[int, bool]:  # from the preload thread: vLLM's worker reads them too
                got = asyncio.run_coroutine_threadsafe(self.engine.preload_parts(adapters), loop).result(timeout=600)
                return got["documents"], got["full"]

            preload(docs, self.adapter_doc_ids, background=True, on_batch=to_worker if worker_merge else None)

        async def load(entry) -> None:
            await self.engine.load_adapter(entry.lora_name, entry.lora_id, entry.path)

        merged = MergedAdapterLRU(docs, self.cache_root, cfg.cache_max_entries, cfg.cache_max_bytes, on_evict=unload,
                                  worker_merge=worker_merge, load=load, policy=cfg.merge_policy)
        metrics = ServerMetrics()
        metrics.doc_adapters.set_function(docs.__len__)
        return RAGService(self.retriever, docs, merged, self.engine, AutoTokenizer.from_pretrained(self.model_path),
                          metrics, self.augmentations, max_lora_rank=cfg.max_lora_rank,
                          default_mode=cfg.default_mode, served_model_name=self.model_path.name)

    def app(self):
        from serving.app import create_app

        return create_app(self.build_service, self.cfg, on_shutdown=self.close)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
        if self._tmp is not None:
            self._tmp.cleanup()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serving", description="Parametric RAG, OpenAI-compatible server")
    add_arguments(p)
    return p


def serve(cfg: ServerConfig) -> int:
    import uvicorn

    server = Server(cfg)
    where = f"http://{cfg.host}:{cfg.port}/v1"
    logger.info("starting vLLM, then serving on %s (models: prag-<mode>)%s", where,
                "; API key required" if cfg.api_key else "")
    uvicorn.run(server.app(), host=cfg.host, port=cfg.port, log_level=cfg.log_level, timeout_graceful_shutdown=5)
    return 0


def _audit_file_access(log_path: str) -> None:
    """Log every file this process opens, creates, renames or deletes (Python audit hook;
    used by the tests to show that no request makes the server touch a file it should not)."""
    log = open(log_path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (lives as long as the process)
    events = {"open", "os.remove", "os.rename", "os.mkdir", "os.rmdir", "shutil.rmtree"}
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def hook(event: str, args: tuple) -> None:
        if event not in events or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        kind = event
        if event == "open":
            mode, flags = (list(args[1:3]) + [None, None])[:2]
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & write_flags)
            kind = "write" if writes else "read"
        log.write(f"{kind}\t{os.fsdecode(args[0])}\n")

    sys.addaudithook(hook)


def main(argv: list[str] | None = None) -> int:
    if os.environ.get("PRAG_AUDIT_FILES"):
        _audit_file_access(os.environ["PRAG_AUDIT_FILES"])
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("bm25s").setLevel(logging.WARNING)
        logging.getLogger("elastic_transport").setLevel(logging.ERROR)  # it logs each retry with a traceback
        return serve(cfg)
    except PragError as exc:
        print(f"prag serve: error: {exc}", file=sys.stderr)
        return 2
