"""HTTP middleware: the request-body limit (413) and the API key (401)."""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from serving.protocol import error_body


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


CallNext = Callable[[Request], Awaitable[Response]]


def api_key_check(api_key: str | None) -> Callable[[Request, CallNext], Awaitable[Response]]:
    """HTTP middleware: with ``api_key`` set, every path but ``/health`` needs
    ``Authorization: Bearer <api_key>`` (compared in constant time), else a 401."""

    async def check(request: Request, call_next: CallNext) -> Response:
        if api_key and request.url.path != "/health":
            header = request.headers.get("authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
                return JSONResponse(error_body(401, "Incorrect or missing API key (Authorization: Bearer <key>)",
                                               code="invalid_api_key"), status_code=401)
        return await call_next(request)

    return check
