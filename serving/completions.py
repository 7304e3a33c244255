"""One completion request (``POST /v1/chat/completions``, ``POST /v1/completions``), end to end.

:class:`CompletionHandler` checks the request against the server's limits, has the service
retrieve, pin the merged adapter and render the prompt (:class:`serving.service.RAGService`),
and starts generation; :class:`Generation` answers with vLLM's tokens, as one JSON body or
as server-sent events, and releases the adapter and records the metrics when it ends.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi.responses import JSONResponse, Response, StreamingResponse

from serving.config import ServerConfig
from serving.errors import is_vllm_refusal
from serving.protocol import ChatCompletionRequest, CompletionRequest, OpenAIError, error_body
from serving.service import Plan, RAGService

logger = logging.getLogger(__name__)

AnyRequest = ChatCompletionRequest | CompletionRequest


def sampling_args(req: AnyRequest) -> dict:
    """The request's sampling parameters, as :meth:`serving.engine.AsyncEngine.sampling_params` takes them."""
    return dict(temperature=req.temperature, top_p=req.top_p, seed=req.seed, stop=req.stop,
                presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                ignore_eos=req.ignore_eos, min_tokens=req.min_tokens)


class CompletionHandler:
    """Serves completion requests on ``service`` within the limits of ``cfg``
    (``default_top_k``, ``max_top_k``, ``max_tokens_limit``, ``default_max_tokens``, ``max_model_len``)."""

    def __init__(self, service: RAGService, cfg: ServerConfig):
        self.service = service
        self.cfg = cfg

    async def __call__(self, req: AnyRequest, *, chat: bool) -> Response:
        s, t0 = self.service, time.perf_counter()
        mode = s.resolve_mode(req.model, req.mode)
        k = self._top_k(req)
        requested = (req.max_completion_tokens or req.max_tokens) if chat else req.max_tokens
        if requested is not None and requested > self.cfg.max_tokens_limit:
            raise OpenAIError(400, f"max_tokens must be at most {self.cfg.max_tokens_limit}, got {requested}",
                              param="max_tokens")
        question = req.question()
        plan = await s.plan(question, mode, k)
        try:
            if chat:
                msgs = [{"role": m.role, "content": m.text()} for m in req.messages]
                prompt_ids = await asyncio.to_thread(s.chat_prompt_ids, msgs, question, plan)
            else:
                prompt_ids = await asyncio.to_thread(s.completion_prompt_ids, question, plan)
            max_tokens = self._max_tokens(requested, len(prompt_ids), chat)
            # vLLM checks the parameters here, before any response starts (a refusal is a 400)
            params = s.engine.sampling_params(max_tokens=max_tokens, **sampling_args(req))
        except BaseException:
            s.release(plan)
            raise
        gen = Generation(s, req, plan, prompt_ids, chat=chat, t0=t0,
                         echo=question if (not chat and req.echo) else "")
        gen.start(params)
        return gen.stream() if req.stream else await gen.answer()

    def _top_k(self, req: AnyRequest) -> int:
        k = self.cfg.default_top_k if req.top_k is None else req.top_k
        if not 1 <= k <= self.cfg.max_top_k:
            raise OpenAIError(400, f"top_k must be between 1 and {self.cfg.max_top_k}, got {k}", param="top_k")
        return k

    def _max_tokens(self, requested: int | None, n_prompt: int, chat: bool) -> int:
        """The completion's budget: what was asked for (or the default), if the context has room."""
        limit = self.cfg.max_model_len
        room = limit - n_prompt
        max_tokens = requested if requested is not None else min(self.cfg.default_max_tokens, room)
        if room < 1 or max_tokens > room:
            raise OpenAIError(400, f"This model's maximum context length is {limit} tokens; the prompt has "
                                   f"{n_prompt} tokens and {max_tokens} completion tokens were asked for",
                              param="messages" if chat else "prompt", code="context_length_exceeded")
        return max_tokens


class Generation:
    """One request's generation and its answer (owns the plan's adapter pin until it ends)."""

    def __init__(self, service: RAGService, req: AnyRequest, plan: Plan, prompt_ids: list[int], *, chat: bool,
                 t0: float, echo: str):
        self.service, self.req, self.plan, self.prompt_ids = service, req, plan, prompt_ids
        self.chat = chat
        self.t0 = t0
        """When the request arrived (``time.perf_counter``), for the latency metric."""
        self.echo = echo
        """Text the answer starts with: the prompt, when a completion request asks for it back."""
        self.rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.deltas = None

    def start(self, params) -> None:
        self.deltas = self.service.engine.stream(self.prompt_ids, self.rid, params, adapter=self.plan.adapter)

    @property
    def headers(self) -> dict[str, str]:
        return {"X-Prag-Mode": self.plan.mode.name, "X-Prag-Parametric": json.dumps(self.plan.parametric),
                "X-Prag-In-Context": json.dumps([d.id for d in self.plan.in_context])}

    def finish(self, n_out: int, status: int) -> None:
        """Release the adapter and record the request (exactly once, however it ended)."""
        s, mode = self.service, self.plan.mode.name
        s.release(self.plan)
        s.metrics.requests.labels("chat" if self.chat else "completions", mode, str(status)).inc()
        s.metrics.latency.labels(mode).observe(time.perf_counter() - self.t0)
        s.metrics.prompt_tokens.labels(mode).inc(len(self.prompt_ids))
        s.metrics.completion_tokens.labels(mode).inc(n_out)

    def usage(self, n_out: int) -> dict:
        n_prompt = len(self.prompt_ids)
        return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}

    # -- one JSON answer -------------------------------------------------------------------
    async def answer(self) -> JSONResponse:
        text, n_out, reason = self.echo, 0, None
        try:
            async for d in self.deltas:
                text += d.text
                n_out += len(d.token_ids)
                reason = d.finish_reason or reason
        except BaseException as exc:
            self.finish(n_out, 400 if is_vllm_refusal(exc) else 500)
            raise
        self.finish(n_out, 200)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                      "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
        body = {"id": self.rid, "object": "chat.completion" if self.chat else "text_completion",
                "created": int(time.time()), "model": self.req.model, "choices": [choice],
                "usage": self.usage(n_out), "prag": self.plan.info()}
        return JSONResponse(body, headers=self.headers)

    # -- server-sent events ----------------------------------------------------------------
    def stream(self) -> StreamingResponse:
        return StreamingResponse(self._events(), media_type="text/event-stream", headers=self.headers)

    @property
    def _include_usage(self) -> bool:
        return bool(self.req.stream_options and self.req.stream_options.include_usage)

    @property
    def _object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _chunk(self, delta_text: str | None, reason: str | None, first: bool = False) -> str:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": delta_text} if delta_text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": delta_text or "", "finish_reason": reason, "logprobs": None}
        body = {"id": self.rid, "object": self._object, "created": self.created, "model": self.req.model,
                "choices": [choice]}
        if first:
            body["prag"] = self.plan.info()
        if self._include_usage:
            body["usage"] = None
        return _event(body)

    async def _events(self) -> AsyncIterator[str]:
        n_out, status = 0, 200
        try:
            yield self._chunk(self.echo, None, first=self.chat or not self.echo)
            async for d in self.deltas:
                n_out += len(d.token_ids)
                if d.text or d.finish_reason:
                    yield self._chunk(d.text, d.finish_reason)
            if self._include_usage:
                yield _event({"id": self.rid, "object": self._object, "created": self.created, "model": self.req.model,
                              "choices": [], "usage": self.usage(n_out)})
        except asyncio.CancelledError:
            status = 499  # client went away; vLLM aborts the request when its generator closes
            raise
        except Exception as exc:
            if is_vllm_refusal(exc):  # vLLM refused the request after the response started
                status = 400
                logger.warning("vLLM refused stream %s: %s", self.rid, exc)
                body = error_body(400, str(exc), param=getattr(exc, "parameter", None))
            else:
                status = 500
                logger.exception("stream %s failed", self.rid)
                body = error_body(500, f"generation failed: {exc}", type="server_error")
            yield _event(body)
        finally:
            await self.deltas.aclose()
            self.finish(n_out, status)
        yield "data: [DONE]\n\n"


def _event(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"
