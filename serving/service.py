"""One request's Retrieve -> Update -> prompt: what the routes call.

:meth:`RAGService.plan` retrieves top-k for the question, decides which documents go in
as parameters (a usable adapter, within vLLM's max rank) and which in context, and pins
the merged adapter. :meth:`RAGService.prompt_ids` renders the prompt the mode asks for.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

from prag_vllm.augment import Augmentation
from prag_vllm.corpus import Document
from prag_vllm.modes import MODES, Mode, context_block
from prag_vllm.retrieve import Retriever
from serving.adapters.doc_cache import DocAdapterCache
from serving.adapters.merged_cache import MergedAdapterLRU, MergedEntry
from serving.engine import AsyncEngine
from serving.metrics import ServerMetrics
from serving.protocol import OpenAIError

logger = logging.getLogger(__name__)

MODEL_PREFIX = "prag-"
MAX_QUERY_CHARS = 8000
"""Retrieval reads at most this much of the question (the prompt still gets all of it)."""


@dataclass
class Plan:
    """What one request retrieved and how each document is used."""

    mode: Mode
    k: int
    retrieved: list[Document] = field(default_factory=list)
    parametric: list[str] = field(default_factory=list)
    """Documents whose adapters are merged into this request's adapter."""
    in_context: list[Document] = field(default_factory=list)
    """Documents placed in the prompt."""
    rejected: list[str] = field(default_factory=list)
    """Documents whose adapter exists but is unusable (answered in context instead)."""
    entry: MergedEntry | None = None
    cache_hit: bool | None = None
    retrieve_seconds: float = 0.0
    adapter_seconds: float = 0.0
    """Retrieved document ids -> merged adapter loaded in vLLM."""
    read_seconds: float = 0.0
    """Of which: choosing the documents (reading and validating adapters not in memory yet)."""
    load_seconds: float = 0.0
    """Of which: vLLM loading the merged adapter (cache misses)."""
    released: bool = False

    @property
    def adapter(self) -> tuple[str, int, object] | None:
        return (self.entry.lora_name, self.entry.lora_id, self.entry.path) if self.entry else None

    def info(self) -> dict:
        """The ``prag`` field of a response (the openai client keeps unknown fields)."""
        return {"mode": self.mode.name, "top_k": self.k, "retrieved": [d.id for d in self.retrieved],
                "parametric": self.parametric, "in_context": [d.id for d in self.in_context],
                "rejected_adapters": self.rejected,
                "adapter": None if self.entry is None else {
                    "key": self.entry.key, "rank": self.entry.rank, "cache_hit": self.cache_hit,
                    "worker_merge": self.entry.manifest,
                    "ready_ms": round(self.adapter_seconds * 1000, 3),
                    "read_ms": round(self.read_seconds * 1000, 3),
                    "merge_ms": None if self.cache_hit else round(self.entry.merge_seconds * 1000, 3),
                    "vllm_load_ms": None if self.cache_hit else round(self.load_seconds * 1000, 3)},
                "retrieve_ms": round(self.retrieve_seconds * 1000, 3)}


class RAGService:
    """Retrieval, adapter caches and prompt rendering over one engine."""

    def __init__(self, retriever: Retriever, docs: DocAdapterCache, merged: MergedAdapterLRU, engine: AsyncEngine,
                 tokenizer, metrics: ServerMetrics, augmentations: dict[str, Augmentation] | None = None,
                 *, max_lora_rank: int, default_mode: str, served_model_name: str):
        self.retriever = retriever
        self.docs = docs
        self.merged = merged
        self.engine = engine
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.augmentations = augmentations or {}
        self.max_lora_rank = max_lora_rank
        self.default_mode = default_mode
        self.served_model_name = served_model_name
        self._retrieve_lock = threading.Lock()

    # -- model name -> mode -------------------------------------------------------------
    def model_names(self) -> list[str]:
        return [MODEL_PREFIX + m for m in MODES]

    def resolve_mode(self, model: str, mode: str | None) -> Mode:
        if model.startswith(MODEL_PREFIX) and model[len(MODEL_PREFIX):] in MODES:
            implied = model[len(MODEL_PREFIX):]
        elif model == self.served_model_name:
            implied = self.default_mode
        else:
            raise OpenAIError(404, f"The model '{model}' does not exist; GET /v1/models lists "
                                   f"{', '.join(self.model_names())}", param="model", code="model_not_found")
        if mode is not None and mode not in MODES:
            raise OpenAIError(400, f"unknown mode {mode!r}; choose from {', '.join(MODES)}", param="mode",
                              code="invalid_mode")
        return MODES[mode or implied]

    # -- Retrieve + Update ----------------------------------------------------------------
    def _retrieve(self, question: str, k: int) -> list[Document]:
        with self._retrieve_lock:
            return [h.doc for h in self.retriever.retrieve([question[:MAX_QUERY_CHARS]], k)[0]]

    def _select(self, docs: list[Document]) -> tuple[list[str], list[str]]:
        """Documents with a usable adapter, best first, within the engine's max rank; and the rejected ones."""
        chosen, rejected, rank = [], [], 0
        if not self.engine.settings.enable_lora:
            return chosen, rejected
        with_file = [d.id for d in docs if d.id in self.docs.rejected or self.docs.has(d.id)]
        adapters = dict(zip(with_file, self.docs.get_many(with_file)))  # files not in memory: read in parallel
        for d in docs:
            if d.id not in adapters:
                continue
            adapter = adapters[d.id]
            if adapter is None:  # unusable: reported on every request, not only the first
                rejected.append(d.id)
            elif rank + adapter.r <= self.max_lora_rank:
                chosen.append(d.id)
                rank += adapter.r
        return chosen, rejected

    async def _acquire(self, doc_ids: list[str]):
        """The merged adapter of ``doc_ids``, loaded in vLLM (the LRU loads new entries and
        cached manifests). If vLLM cannot load it (a document adapter was replaced since it
        was validated), the documents are read and validated again and the merge retried once."""
        try:
            return await self.merged.acquire(doc_ids)
        except Exception as exc:
            logger.warning("merged adapter of %s failed to load (%s); reading its documents again", doc_ids, exc)
            self.docs.forget(doc_ids)
            return await self.merged.acquire(doc_ids)

    async def plan(self, question: str, mode: Mode, k: int) -> Plan:
        plan = Plan(mode=mode, k=k)
        if not mode.retrieves:
            return plan
        t0 = time.perf_counter()
        plan.retrieved = await asyncio.to_thread(self._retrieve, question, k)
        t1 = time.perf_counter()
        plan.retrieve_seconds = t1 - t0
        if mode.parametric and plan.retrieved:
            chosen, plan.rejected = await asyncio.to_thread(self._select, plan.retrieved)
            plan.read_seconds = time.perf_counter() - t1
            if chosen:
                entry, left_out, hit = await self._acquire(chosen)
                plan.rejected += left_out
                plan.entry, plan.cache_hit = entry, hit
                if entry is not None and not hit:
                    self.metrics.merge.observe(entry.merge_seconds)
                    plan.load_seconds = entry.load_seconds
                plan.parametric = list(entry.doc_ids) if entry else []
                (self.metrics.cache_hits if hit else self.metrics.cache_misses).inc()
            plan.adapter_seconds = time.perf_counter() - t1
            if plan.entry is not None:
                self.metrics.adapter_ready.labels("hit" if plan.cache_hit else "miss").observe(plan.adapter_seconds)
            self._cache_gauges()
        if mode.name == "parametric":
            plan.in_context = [d for d in plan.retrieved if d.id not in plan.parametric]
            self.metrics.in_context_docs.inc(len(plan.in_context))
        else:
            plan.in_context = list(plan.retrieved)
        return plan

    def release(self, plan: Plan) -> None:
        """Unpin the plan's merged adapter (idempotent); the cache may shrink back to its bound
        now (an entry added while every other one was pinned), so the gauges follow."""
        if plan.entry is not None and not plan.released:
            plan.released = True
            self.merged.release(plan.entry)
            self._cache_gauges()

    def _cache_gauges(self) -> None:
        self.metrics.cache_entries.set(self.merged.size)
        self.metrics.cache_bytes.set(self.merged.nbytes)

    # -- prompts ------------------------------------------------------------------------
    def chat_prompt_ids(self, messages: list[dict], question: str, plan: Plan) -> list[int]:
        """The conversation with its last user turn replaced by the mode's question turn."""
        turn = plan.mode.messages(question, plan.in_context, self.augmentations)[-1]
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        conversation = messages[:last_user] + [turn] + messages[last_user + 1:]
        text = self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def completion_prompt_ids(self, prompt: str, plan: Plan) -> list[int]:
        """Raw completion: the in-context passages (if any) followed by the prompt, no template."""
        text = context_block(plan.mode.passages(plan.in_context, self.augmentations)) + prompt
        return self.tokenizer(text)["input_ids"]
