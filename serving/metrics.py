"""Prometheus metrics of the server, in a registry of its own (``GET /metrics``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
MERGE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1)


class ServerMetrics:
    """The counters, histograms and gauges the app updates."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("prag_requests", "Requests by endpoint, mode and HTTP status",
                                ["endpoint", "mode", "status"], registry=r)
        self.latency = Histogram("prag_request_latency_seconds", "End-to-end request latency by mode", ["mode"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.adapter_ready = Histogram("prag_adapter_ready_seconds",
                                       "Retrieved document ids to merged adapter loaded in vLLM",
                                       ["cache"], buckets=MERGE_BUCKETS, registry=r)
        self.merge = Histogram("prag_adapter_merge_seconds", "Time to merge and write one adapter (cache misses)",
                               buckets=MERGE_BUCKETS, registry=r)
        self.cache_hits = Counter("prag_adapter_cache_hits", "Merged-adapter cache hits", registry=r)
        self.cache_misses = Counter("prag_adapter_cache_misses", "Merged-adapter cache misses", registry=r)
        self.cache_entries = Gauge("prag_adapter_cache_entries", "Merged adapters cached", registry=r)
        self.cache_bytes = Gauge("prag_adapter_cache_bytes", "Bytes of merged adapters cached", registry=r)
        self.doc_adapters = Gauge("prag_doc_adapters_in_memory", "Validated per-document adapters held in memory",
                                  registry=r)
        self.in_context_docs = Counter("prag_in_context_fallback_documents",
                                       "Retrieved documents answered in context for want of a usable adapter",
                                       registry=r)
        self.prompt_tokens = Counter("prag_prompt_tokens", "Prompt tokens", ["mode"], registry=r)
        self.completion_tokens = Counter("prag_completion_tokens", "Completion tokens", ["mode"], registry=r)
