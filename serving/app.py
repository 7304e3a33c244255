"""The FastAPI app: OpenAI-compatible routes over :class:`serving.service.RAGService`.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both streaming or not),
``GET /v1/models`` (one model per mode), ``GET /health``, ``GET /metrics`` (Prometheus).
Every error is an OpenAI error body with a 4xx/5xx status; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.protocol import ChatCompletionRequest, CompletionRequest, ErrorResponse, OpenAIError, error_body
from serving.service import RAGService

logger = logging.getLogger(__name__)


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets a 413 (counted as it streams in)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._reject(send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._reject(send)

    async def _reject(self, send):
        body = json.dumps(error_body(413, f"request body larger than {self.max_bytes} bytes",
                                     code="request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


_UNION_BRANCH = re.compile(r"^(function-(after|before|wrap|plain)\[.*\]|(list|dict|tuple)\[.*\]|str|int|float|bool)$")
"""A step of an error's ``loc`` that names a branch of a union type, not a field."""


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    # our own checks (value errors) say the most; a union's other branches only "a valid list"
    first = next((e for e in errors if e.get("type") == "value_error"), errors[0])
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _UNION_BRANCH.match(str(p))]
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON", None
    if not loc and first.get("type") == "model_attributes_type":
        return "request body must be a JSON object (Content-Type: application/json)", None
    if first.get("type") == "string_unicode":  # a field name with a lone surrogate
        return "request body is not valid Unicode (a lone UTF-16 surrogate)", None
    param = ".".join(loc) or None
    here = ("body", *loc)
    locs = {tuple(str(p) for p in e.get("loc", ()) if not _UNION_BRANCH.match(str(p))) for e in errors}
    others = [o for o in locs if o[:len(here)] != here and here[:len(o)] != o]  # not the same field's union branches
    more = f" (and {len(others)} more problems)" if others else ""
    return f"{param + ': ' if param else ''}{first.get('msg', 'invalid value')}{more}", param


def create_app(state_factory: Callable[[], RAGService] | RAGService, *, api_key: str | None = None,
               max_body_bytes: int = 2 << 20, max_top_k: int = 16, default_top_k: int = 3,
               max_model_len: int = 4096, max_tokens_limit: int = 1024, default_max_tokens: int = 128,
               on_shutdown: Callable[[], None] | None = None) -> FastAPI:
    """Build the app. ``state_factory`` builds the service (and starts vLLM) at startup."""
    from contextlib import asynccontextmanager

    holder: dict[str, RAGService] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        holder["svc"] = state_factory() if callable(state_factory) else state_factory
        yield
        if on_shutdown is not None:
            on_shutdown()

    app = FastAPI(title="prag-vllm", description="Parametric RAG on vLLM, OpenAI-compatible", lifespan=lifespan)
    vllm_invalid = _vllm_validation_error()

    def svc() -> RAGService:
        return holder["svc"]

    # -- errors -------------------------------------------------------------------------
    def error(request: Request, body: dict, status: int) -> JSONResponse:
        if "svc" in holder:
            endpoint = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}.get(request.url.path, "other")
            holder["svc"].metrics.requests.labels(endpoint, "-", str(status)).inc()
        return JSONResponse(body, status_code=status)

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError):
        return error(request, exc.body(), exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error(request, error_body(400, message, param=param), 400)

    if vllm_invalid is not None:
        @app.exception_handler(vllm_invalid)
        async def _vllm_invalid(request: Request, exc: Exception):
            """vLLM refused the request's parameters (the boundary should have): a 400, logged."""
            logger.warning("vLLM refused a request on %s: %s", request.url.path, exc)
            return error(request, error_body(400, str(exc), param=getattr(exc, "parameter", None)), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error(request, error_body(exc.status_code, str(exc.detail), code=str(exc.status_code)), exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        logger.exception("internal error on %s", request.url.path)
        return error(request, error_body(500, "internal server error", type="server_error"), 500)

    # -- auth ---------------------------------------------------------------------------
    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path != "/health":
            header = request.headers.get("authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
                return JSONResponse(error_body(401, "Incorrect or missing API key (Authorization: Bearer <key>)",
                                               code="invalid_api_key"), status_code=401)
        return await call_next(request)

    # -- plain routes ---------------------------------------------------------------------
    @app.get("/health", openapi_extra={"security": []})  # no key needed
    async def health():
        s = holder.get("svc")
        if s is None or not s.engine.healthy:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok", "engine": {"dtype": s.engine.dtype, "lora_ops": s.engine.lora_ops},
                "preload": s.docs.preload_state}

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(svc().metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        from prag_vllm.modes import MODES

        now = int(time.time())
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": now, "owned_by": "prag-vllm",
             "description": MODES[name.removeprefix("prag-")].description} for name in svc().model_names()]}

    # -- completions ----------------------------------------------------------------------
    async def _serve(req: ChatCompletionRequest | CompletionRequest, chat: bool):
        s, t0 = svc(), time.perf_counter()
        endpoint = "chat" if chat else "completions"
        mode = s.resolve_mode(req.model, req.mode)
        k = default_top_k if req.top_k is None else req.top_k
        if not 1 <= k <= max_top_k:
            raise OpenAIError(400, f"top_k must be between 1 and {max_top_k}, got {k}", param="top_k")
        requested = (req.max_completion_tokens or req.max_tokens) if chat else req.max_tokens
        if requested is not None and requested > max_tokens_limit:
            raise OpenAIError(400, f"max_tokens must be at most {max_tokens_limit}, got {requested}",
                              param="max_tokens")
        sampling = dict(temperature=req.temperature, top_p=req.top_p, seed=req.seed, stop=req.stop,
                        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                        ignore_eos=req.ignore_eos, min_tokens=req.min_tokens)
        question = req.question()
        plan = await s.plan(question, mode, k)
        try:
            if chat:
                msgs = [{"role": m.role, "content": m.text()} for m in req.messages]
                prompt_ids = await asyncio.to_thread(s.chat_prompt_ids, msgs, question, plan)
            else:
                prompt_ids = await asyncio.to_thread(s.completion_prompt_ids, question, plan)
            room = max_model_len - len(prompt_ids)
            max_tokens = requested if requested is not None else min(default_max_tokens, room)
            if room < 1 or max_tokens > room:
                raise OpenAIError(400, f"This model's maximum context length is {max_model_len} tokens; the prompt "
                                       f"has {len(prompt_ids)} tokens and {max_tokens} completion tokens were asked "
                                       "for", param="messages" if chat else "prompt", code="context_length_exceeded")
            # vLLM checks the parameters here, before any response starts (a refusal is a 400)
            params = s.engine.sampling_params(max_tokens=max_tokens, **sampling)
        except BaseException:
            s.release(plan)
            raise
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        deltas = s.engine.stream(prompt_ids, rid, params, adapter=plan.adapter)
        headers = {"X-Prag-Mode": mode.name, "X-Prag-Parametric": json.dumps(plan.parametric),
                   "X-Prag-In-Context": json.dumps([d.id for d in plan.in_context])}
        echo = question if (not chat and req.echo) else ""

        def finish(n_out: int, status: int) -> None:
            s.release(plan)
            s.metrics.requests.labels(endpoint, mode.name, str(status)).inc()
            s.metrics.latency.labels(mode.name).observe(time.perf_counter() - t0)
            s.metrics.prompt_tokens.labels(mode.name).inc(len(prompt_ids))
            s.metrics.completion_tokens.labels(mode.name).inc(n_out)

        usage = lambda n: {"prompt_tokens": len(prompt_ids), "completion_tokens": n,  # noqa: E731
                           "total_tokens": len(prompt_ids) + n}
        if not req.stream:
            text, n_out, reason = echo, 0, None
            try:
                async for d in deltas:
                    text += d.text
                    n_out += len(d.token_ids)
                    reason = d.finish_reason or reason
            except BaseException as exc:
                finish(n_out, 400 if _is(exc, vllm_invalid) else 500)
                raise
            finish(n_out, 200)
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                       "logprobs": None} if chat else
                      {"index": 0, "text": text, "finish_reason": reason, "logprobs": None})
            body = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                    "model": req.model, "choices": [choice], "usage": usage(n_out), "prag": plan.info()}
            return JSONResponse(body, headers=headers)

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta_text: str | None, reason: str | None, first: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else (
                    {"content": delta_text} if delta_text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta_text or "", "finish_reason": reason, "logprobs": None}
            body = {"id": rid, "object": obj, "created": created, "model": req.model, "choices": [choice]}
            if first:
                body["prag"] = plan.info()
            if include_usage:
                body["usage"] = None
            return f"data: {json.dumps(body)}\n\n"

        async def events() -> AsyncIterator[str]:
            n_out, status = 0, 200
            try:
                yield chunk(echo, None, first=True) if chat or not echo else chunk(echo, None)
                async for d in deltas:
                    n_out += len(d.token_ids)
                    if d.text or d.finish_reason:
                        yield chunk(d.text, d.finish_reason)
                if include_usage:
                    yield f"data: {json.dumps({'id': rid, 'object': obj, 'created': created, 'model': req.model, 'choices': [], 'usage': usage(n_out)})}\n\n"
            except asyncio.CancelledError:
                status = 499  # client went away; vLLM aborts the request when its generator closes
                raise
            except Exception as exc:
                if _is(exc, vllm_invalid):  # vLLM refused the request after the response started
                    status = 400
                    logger.warning("vLLM refused stream %s: %s", rid, exc)
                    body = error_body(400, str(exc), param=getattr(exc, "parameter", None))
                else:
                    status = 500
                    logger.exception("stream %s failed", rid)
                    body = error_body(500, f"generation failed: {exc}", type="server_error")
                yield f"data: {json.dumps(body)}\n\n"
            finally:
                await deltas.aclose()
                finish(n_out, status)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    @app.post("/v1/chat/completions", responses=ERROR_RESPONSES)
    async def chat_completions(req: ChatCompletionRequest):
        return await _serve(req, chat=True)

    @app.post("/v1/completions", responses=ERROR_RESPONSES)
    async def completions(req: CompletionRequest):
        return await _serve(req, chat=False)

    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    _describe_limits(app, max_top_k=max_top_k, max_tokens_limit=max_tokens_limit)
    return app


ERROR_RESPONSES: dict[int | str, dict] = {
    status: {"model": ErrorResponse, "description": text} for status, text in (
        (400, "invalid request (the error body says which parameter)"), (401, "missing or wrong API key"),
        (404, "unknown model"), (413, "request body too large"), (500, "internal server error"))}
"""The error answers of the completion routes, as documented in the OpenAPI schema."""


def _vllm_validation_error() -> type[Exception] | None:
    """vLLM's exception for a request it refuses (raised when ``SamplingParams`` are checked)."""
    try:
        from vllm.exceptions import VLLMValidationError
    except ImportError:  # an app without vLLM (schema only)
        return None
    return VLLMValidationError


def _is(exc: BaseException, cls: type[Exception] | None) -> bool:
    return cls is not None and isinstance(exc, cls)


def _describe_limits(app: FastAPI, *, max_top_k: int, max_tokens_limit: int) -> None:
    """The published OpenAPI schema, made to describe the server as configured: the ranges of
    ``top_k`` and ``max_tokens``, errors as 400 with an OpenAI error body (not FastAPI's 422)."""
    plain = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = plain()
        components = schema.get("components", {}).get("schemas", {})
        for name in ("ChatCompletionRequest", "CompletionRequest"):
            props = components.get(name, {}).get("properties", {})
            if "top_k" in props:
                props["top_k"]["maximum"] = max_top_k
            for field in ("max_tokens", "max_completion_tokens"):
                for branch in props.get(field, {}).get("anyOf", []):
                    if branch.get("type") == "integer":
                        branch["maximum"] = max_tokens_limit
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        schema["security"] = [{"bearer": []}]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
