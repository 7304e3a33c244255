"""The FastAPI app: OpenAI-compatible routes over :class:`serving.service.RAGService`.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both streaming or not,
handled by :class:`serving.completions.CompletionHandler`), ``GET /v1/models`` (one model
per mode), ``GET /health``, ``GET /metrics`` (Prometheus). Every error is an OpenAI error
body with a 4xx/5xx status (:mod:`serving.errors`); the server keeps serving.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from serving.completions import CompletionHandler
from serving.config import ServerConfig
from serving.errors import ERROR_RESPONSES, install_error_handlers
from serving.middleware import BodyLimit, api_key_check
from serving.openapi import describe_limits
from serving.protocol import ChatCompletionRequest, CompletionRequest
from serving.service import RAGService


def create_app(service: RAGService | Callable[[], RAGService], cfg: ServerConfig | None = None, *,
               on_shutdown: Callable[[], None] | None = None) -> FastAPI:
    """Build the app. ``service`` is the service or a factory that builds it (and starts vLLM)
    at startup; ``cfg`` gives the API key and the request limits (``max_body_bytes``,
    ``max_top_k``, ``default_top_k``, ``max_model_len``, ``max_tokens_limit``,
    ``default_max_tokens``); None: the defaults. ``on_shutdown`` runs when the app stops."""
    cfg = cfg if cfg is not None else ServerConfig()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.service = service() if callable(service) else service
        app.state.completions = CompletionHandler(app.state.service, cfg)
        yield
        if on_shutdown is not None:
            on_shutdown()

    app = FastAPI(title="prag-vllm", description="Parametric RAG on vLLM, OpenAI-compatible", lifespan=lifespan)
    app.state.service = None
    install_error_handlers(app)
    app.middleware("http")(api_key_check(cfg.api_key))

    @app.get("/health", openapi_extra={"security": []})  # no key needed
    async def health():
        s: RAGService | None = app.state.service
        if s is None or not s.engine.healthy:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok", "engine": {"dtype": s.engine.dtype, "lora_ops": s.engine.lora_ops},
                "preload": s.docs.preload_state}

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(app.state.service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        from prag_vllm.modes import MODES

        now = int(time.time())
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": now, "owned_by": "prag-vllm",
             "description": MODES[name.removeprefix("prag-")].description} for name in app.state.service.model_names()]}

    @app.post("/v1/chat/completions", responses=ERROR_RESPONSES)
    async def chat_completions(req: ChatCompletionRequest):
        return await app.state.completions(req, chat=True)

    @app.post("/v1/completions", responses=ERROR_RESPONSES)
    async def completions(req: CompletionRequest):
        return await app.state.completions(req, chat=False)

    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)
    describe_limits(app, max_top_k=cfg.max_top_k, max_tokens_limit=cfg.max_tokens_limit)
    return app
