"""The published OpenAPI schema, made to describe the server as configured."""

from __future__ import annotations

from fastapi import FastAPI


def describe_limits(app: FastAPI, *, max_top_k: int, max_tokens_limit: int) -> None:
    """Make ``app``'s schema give the ranges of ``top_k`` and ``max_tokens``, errors as 400
    with an OpenAI error body (not FastAPI's 422), and bearer-key security."""
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
