"""The OpenAI-compatible FastAPI server: per-request retrieval and merged adapters on vLLM.

Modules: ``config`` (settings), ``protocol`` (OpenAI request models, error bodies),
``adapter_cache`` (Update online: validated per-document adapters, LRU of merged ones),
``engine`` (Generate online: vLLM's async engine in-process), ``service`` (one request's
Retrieve -> Update -> prompt), ``metrics`` (Prometheus), ``app`` (routes), ``server``
(assembly and ``main``).
"""
