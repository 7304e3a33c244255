"""Server settings: one dataclass, filled from a TOML file and/or command-line flags."""

from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

import tomllib

from prag_vllm.errors import InputError
from prag_vllm.merge import DEFAULT_MERGE_POLICY
from prag_vllm.retrieve import DEFAULT_TOP_K, MAX_TOP_K


@dataclass
class ServerConfig:
    """Everything ``python -m serving`` needs. Every field is also a flag (``--max-loras``)."""

    corpus: str | None = None
    """Corpus file (JSON Lines or HotpotQA/2Wiki JSON). None: the invented demo corpus."""
    work_dir: str = "runs/demo"
    """Workspace holding the BM25 index, augmentations and the adapter store (as written by ``prag``)."""
    adapter_store: str | None = None
    """Per-document adapter store; None: the workspace's store for ``model``."""
    retriever: str = "bm25"
    """``bm25`` (the embedded index in the workspace) or ``elasticsearch`` (``es_*`` settings)."""
    es_url: str = "http://localhost:9200"
    """Elasticsearch URL (``retriever = "elasticsearch"``)."""
    es_index: str = "prag-corpus"
    """Elasticsearch index, built by ``prag index --retriever elasticsearch``; the server only reads it."""
    es_api_key: str | None = None
    """Elasticsearch API key (or $PRAG_ES_API_KEY)."""
    es_user: str | None = None
    """Elasticsearch basic-auth user; the password comes from $PRAG_ES_PASSWORD."""
    es_ca_certs: str | None = None
    """PEM CA bundle for an https cluster."""
    es_verify_certs: int = 1
    """0 turns TLS certificate checks off (tests only)."""
    model: str = ""
    """Registry name or local Hugging Face model directory; empty: the default model."""
    host: str = "127.0.0.1"
    """Address to bind (loopback by default)."""
    port: int = 8000
    """TCP port."""
    api_key: str | None = None
    """If set (or $PRAG_API_KEY), every endpoint but /health needs ``Authorization: Bearer <key>``."""
    default_mode: str = "parametric"
    """Mode used when the model name is the base model's rather than ``prag-<mode>``."""
    default_top_k: int = DEFAULT_TOP_K
    """Documents retrieved per request unless the request says otherwise."""
    max_top_k: int = 16
    """Largest top-k a request may ask for."""
    merge_policy: str = DEFAULT_MERGE_POLICY
    """How the top-k documents' adapters combine: ``mean`` of their updates (default) or ``sum`` (PRAG)."""
    dtype: str = "auto"
    """vLLM dtype: ``bfloat16``, ``float32`` (exactness checks) or ``auto`` (bf16 where the
    machine multiplies it natively, else float32)."""
    max_model_len: int = 4096
    """Longest prompt + completion in tokens; longer requests get a 400."""
    max_tokens_limit: int = 1024
    """Largest ``max_tokens`` a request may ask for."""
    default_max_tokens: int = 128
    """``max_tokens`` when a request does not give one."""
    enable_lora: int = 1
    """1: serve merged adapters. 0: a base-model-only engine (no LoRA layers at all); every
    retrieved document goes in context, also in the parametric modes."""
    max_lora_rank: int = 8
    """vLLM's largest adapter rank; a merged adapter may not exceed it (rank-2 adapters: 4
    documents). Documents beyond it are placed in context instead (and reported)."""
    max_loras: int = 8
    """Distinct adapters vLLM runs in one batch."""
    max_cpu_loras: int | None = None
    """Adapters vLLM keeps loaded in memory (None: vLLM's default, = max_loras)."""
    max_num_seqs: int = 32
    """Requests vLLM schedules together."""
    enable_prefix_caching: int = 1
    """1: vLLM reuses the KV cache of a prompt prefix it has seen (system prompt, repeated
    passages). 0: every prompt is computed in full (benchmarks comparing prompt lengths)."""
    preload_adapters: int = 0
    """1: read and validate the corpus's document adapters into memory at start, in the
    background (bounded by ``doc_cache_max_bytes``), so first requests read no adapter file.
    With ``worker_merge``, vLLM's worker reads them into its own cache too (bounded by
    ``PRAG_WORKER_ADAPTER_CACHE_MB``), a few at a time between engine steps; progress is in
    ``GET /health`` (``preload``)."""
    worker_merge: int = 1
    """1: the server writes a merge manifest and vLLM's worker concatenates the document
    adapters itself, from ones it keeps in memory (needs this project's vLLM plugin; off
    when ``PRAG_STOCK_LORA_OPS=1``). 0: the server writes the merged tensors."""
    doc_cache_max_bytes: int = 512 << 20
    """Bytes of validated per-document adapters kept in memory (LRU). With ``worker_merge``
    the server keeps no tensors (vLLM's worker does), only a ~2 KiB record per document."""
    cache_max_entries: int = 256
    """Merged adapters kept on disk (LRU)."""
    cache_max_bytes: int = 1 << 30
    """Bytes of merged adapters kept on disk (LRU)."""
    cache_dir: str | None = None
    """Where merged adapters are written; None: a private temporary directory (in /dev/shm
    when available), removed at shutdown."""
    max_body_bytes: int = 2 << 20
    """Largest request body accepted; larger gets a 413."""
    log_level: str = "info"
    """Logging level."""
    log_file: str | None = None
    """Where ``prag serve`` writes its log; None: ``<work_dir>/prag.log``. Replicas sharing one
    (read-only) work dir each give their own."""

    def validate(self) -> ServerConfig:
        from prag_vllm.merge import check_merge_policy
        from prag_vllm.modes import get_mode

        get_mode(self.default_mode)
        check_merge_policy(self.merge_policy)
        if not 1 <= self.max_top_k <= MAX_TOP_K:
            raise InputError(f"max_top_k must be between 1 and {MAX_TOP_K}, got {self.max_top_k}")
        if not 1 <= self.default_top_k <= self.max_top_k:
            raise InputError(f"default_top_k must be between 1 and max_top_k={self.max_top_k}")
        if self.corpus is not None and not Path(self.corpus).is_file():
            raise InputError(f"corpus file not found: {self.corpus}")
        if not 0 < self.port < 65536:
            raise InputError(f"port must be 1..65535, got {self.port}")
        for name in ("max_model_len", "max_tokens_limit", "default_max_tokens", "max_loras", "max_num_seqs",
                     "cache_max_entries", "cache_max_bytes", "max_body_bytes"):
            if getattr(self, name) <= 0:
                raise InputError(f"{name} must be positive")
        for name in ("enable_lora", "enable_prefix_caching", "preload_adapters", "worker_merge"):
            if getattr(self, name) not in (0, 1):
                raise InputError(f"{name} must be 0 or 1, got {getattr(self, name)}")
        from prag_vllm.generate import resolve_dtype
        from prag_vllm.vllm_plugin import settings

        # PRAG_* numbers vLLM's processes read: one clear error now, not a traceback later; and
        # before resolve_dtype, whose first import of the plugin's ops reads them
        settings.check()
        resolve_dtype(self.dtype)
        if self.doc_cache_max_bytes <= 0:
            raise InputError("doc_cache_max_bytes must be positive")
        if self.retriever not in ("bm25", "elasticsearch"):
            raise InputError(f"unknown retriever {self.retriever!r} (choose from bm25, elasticsearch)")
        if self.es_user and not os.environ.get("PRAG_ES_PASSWORD"):
            raise InputError("es_user needs its password in $PRAG_ES_PASSWORD")
        if self.api_key is None:
            self.api_key = os.environ.get("PRAG_API_KEY") or None
        return self


def retriever_config(cfg: ServerConfig, index_dir: str | os.PathLike):
    """The :class:`prag_vllm.retrieve.factory.RetrieverConfig` these settings describe."""
    from prag_vllm.retrieve.factory import RetrieverConfig

    if cfg.retriever != "elasticsearch":
        return RetrieverConfig(kind="bm25", index_dir=str(index_dir))
    from prag_vllm.retrieve.elasticsearch import ElasticsearchConfig

    return RetrieverConfig(kind="elasticsearch", es=ElasticsearchConfig(
        url=cfg.es_url, index=cfg.es_index, api_key=cfg.es_api_key or os.environ.get("PRAG_ES_API_KEY") or None,
        basic_auth=(cfg.es_user, os.environ["PRAG_ES_PASSWORD"]) if cfg.es_user else None,
        ca_certs=cfg.es_ca_certs, verify_certs=bool(cfg.es_verify_certs)))


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each dataclass field (used as the flag's --help)."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _field_type(f) -> type:
    t = str(f.type)
    return int if t.startswith("int") else str


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`ServerConfig` field (defaults None: 'not given on the command line')."""
    parser.add_argument("--config", default=None, help="TOML file with any of the settings below")
    docs = field_docs(ServerConfig)
    for f in fields(ServerConfig):
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=_field_type(f), default=None,
                            help=docs.get(f.name, "").replace("%", "%%") or None)


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """Defaults, overridden by the TOML file, overridden by flags."""
    values: dict = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise InputError(f"config file not found: {path}")
        try:
            values = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: not valid TOML ({exc})") from None
        known = {f.name for f in fields(ServerConfig)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"{path}: unknown setting(s) {unknown}")
    for f in fields(ServerConfig):
        flag = getattr(args, f.name, None)
        if flag is not None:
            values[f.name] = flag
    for f in fields(ServerConfig):
        if f.name in values and values[f.name] is not None and f.default is not MISSING:
            want = _field_type(f)
            if want is int and (isinstance(values[f.name], bool) or not isinstance(values[f.name], int)):
                raise InputError(f"setting {f.name} must be an integer, got {values[f.name]!r}")
    return ServerConfig(**values).validate()
