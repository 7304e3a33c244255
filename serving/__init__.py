"""The OpenAI-compatible FastAPI server: per-request retrieval and merged adapters on vLLM.

Modules: ``config`` (settings), ``protocol`` (OpenAI request models, error bodies),
``adapters/`` (Update online: validation, validated per-document adapters, preloading,
LRU of merged ones), ``engine`` (Generate online: vLLM's async engine in-process),
``service`` (one request's Retrieve -> Update -> prompt), ``completions`` (one completion
request, JSON or streamed), ``errors`` (OpenAI error answers), ``middleware`` (body limit,
API key), ``openapi`` (the published schema), ``metrics`` (Prometheus), ``app`` (routes),
``server`` (assembly and ``main``).
"""
