"""Every error as an OpenAI error body with its HTTP status (4xx/5xx); the server keeps serving.

:func:`install_error_handlers` answers :class:`~serving.protocol.OpenAIError`, request
validation (a 400 naming the parameter, not FastAPI's 422), vLLM refusing a request's
parameters (400), HTTP errors (404, 405, ...), a dead engine (503: retryable, and ``/health``
says 503 too) and anything else (500, logged), and counts
each in the service's request metrics.
"""

from __future__ import annotations

import functools
import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.protocol import ErrorResponse, OpenAIError, error_body

logger = logging.getLogger(__name__)

ERROR_RESPONSES: dict[int | str, dict] = {
    status: {"model": ErrorResponse, "description": text} for status, text in (
        (400, "invalid request (the error body says which parameter)"), (401, "missing or wrong API key"),
        (404, "unknown model"), (413, "request body too large"), (500, "internal server error"),
        (503, "the engine is not available (a balancer may retry on another replica)"))}
"""The error answers of the completion routes, as documented in the OpenAPI schema."""

ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
"""Request path -> the ``endpoint`` label of the request metrics."""

_UNION_BRANCH = re.compile(r"^(function-(after|before|wrap|plain)\[.*\]|(list|dict|tuple)\[.*\]|str|int|float|bool)$")
"""A step of an error's ``loc`` that names a branch of a union type, not a field."""


@functools.cache
def vllm_validation_error() -> type[Exception] | None:
    """vLLM's exception for a request it refuses (raised when ``SamplingParams`` are checked)."""
    try:
        from vllm.exceptions import VLLMValidationError
    except ImportError:  # an app without vLLM (schema only)
        return None
    return VLLMValidationError


def is_vllm_refusal(exc: BaseException) -> bool:
    """vLLM refused the request's parameters (a 400, not a 500)."""
    cls = vllm_validation_error()
    return cls is not None and isinstance(exc, cls)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The message and parameter of a request that failed validation: the most telling error."""
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


def error_response(request: Request, body: dict, status: int) -> JSONResponse:
    """The error answer, counted in the request metrics (once the service is up)."""
    service = getattr(request.app.state, "service", None)
    if service is not None:
        service.metrics.requests.labels(ENDPOINTS.get(request.url.path, "other"), "-", str(status)).inc()
    return JSONResponse(body, status_code=status)


async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
    return error_response(request, exc.body(), exc.status)


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    message, param = validation_message(exc)
    return error_response(request, error_body(400, message, param=param), 400)


async def _vllm_invalid(request: Request, exc: Exception) -> JSONResponse:
    """vLLM refused the request's parameters (the boundary should have): a 400, logged."""
    logger.warning("vLLM refused a request on %s: %s", request.url.path, exc)
    return error_response(request, error_body(400, str(exc), param=getattr(exc, "parameter", None)), 400)


async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(request, error_body(exc.status_code, str(exc.detail), code=str(exc.status_code)),
                          exc.status_code)


async def _internal(request: Request, exc: Exception) -> JSONResponse:
    service = getattr(request.app.state, "service", None)
    if service is not None and not service.engine.healthy:  # a dead engine: retryable on another replica
        logger.error("engine unavailable on %s: %s", request.url.path, exc)
        return error_response(request, error_body(503, "the engine is not available; retry (on another replica)",
                                                  type="server_error"), 503)
    logger.exception("internal error on %s", request.url.path)
    return error_response(request, error_body(500, "internal server error", type="server_error"), 500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(OpenAIError, _openai_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    if vllm_validation_error() is not None:
        app.add_exception_handler(vllm_validation_error(), _vllm_invalid)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(Exception, _internal)
