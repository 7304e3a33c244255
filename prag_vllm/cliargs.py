"""Shared pieces of the ``prag`` command line: argument types, the parser class, the model
and engine flags, and an engine started on first use.

Every subcommand module (:mod:`prag_vllm.cli`, :mod:`prag_vllm.evaluation.cli`,
:mod:`prag_vllm.benchdata.cli`) imports from here; this module imports none of them, so
the command modules form no import cycle.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from prag_vllm.errors import InputError
from prag_vllm.merge import DEFAULT_MERGE_POLICY

DEFAULT_MAX_MODEL_LEN = 4096
"""``--max-model-len`` of every command that starts an engine."""


class PragParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``prag: error: ...``), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"prag: error: {message} (see `{self.prog} --help`)\n")


def positive(text: str) -> int:
    """argparse type: an integer > 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def count(text: str) -> int:
    """argparse type: a whole number >= 0."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def non_negative(text: str) -> float:
    """argparse type: a number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def top_k(text: str) -> int:
    """argparse type: a valid number of retrieved documents."""
    from prag_vllm.retrieve import check_top_k

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"top-k must be an integer, got {text!r}") from None
    try:
        return check_top_k(value)
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def modes(text: str) -> list[str]:
    """argparse type: comma-separated answering modes, or ``all``."""
    from prag_vllm.modes import MODES, get_mode

    names = list(MODES) if text == "all" else [m.strip() for m in text.split(",") if m.strip()]
    for m in names:
        try:
            get_mode(m)
        except InputError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return names


def add_merge_policy_argument(parser: argparse.ArgumentParser) -> None:
    """``--merge-policy``: how the top-k documents' adapters combine (merge.MERGE_POLICIES)."""
    parser.add_argument("--merge-policy", choices=["sum", "mean"], default=DEFAULT_MERGE_POLICY,
                        help="mean: the documents' updates averaged, each weighted 1/k (default, measured "
                             "better: docs/recipes.md); sum: added up, as the PRAG paper")


def add_verbose_argument(parser: argparse.ArgumentParser, top_level: bool = False) -> None:
    """``-v/--verbose``: vLLM's, torch's and every library's messages on the console (default:
    only into the log file). On a subcommand it does not override the top-level flag."""
    parser.add_argument("-v", "--verbose", action="store_true",
                        default=False if top_level else argparse.SUPPRESS,
                        help="show vLLM's and the libraries' messages (default: only in <work-dir>/prag.log)")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--dtype`` and ``--max-model-len``."""
    from prag_vllm.generate import DTYPES
    from prag_vllm.models import DEFAULT_MODEL

    parser.add_argument("--model", default=DEFAULT_MODEL, help="registry name or local HF model directory")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="auto: bfloat16 where native (AVX512-BF16/AMX/GPU), else float32")
    parser.add_argument("--max-model-len", type=positive, default=DEFAULT_MAX_MODEL_LEN)


def model_path(args: argparse.Namespace) -> Path:
    """Resolve (and fetch on first use) ``args.model`` -- only once the inputs were validated."""
    from prag_vllm.models import resolve_model

    if getattr(args, "model_path", None) is None:
        args.model_path = resolve_model(args.model)
    return args.model_path


def engine_config(args: argparse.Namespace, enable_lora: bool = True):
    """The :class:`~prag_vllm.generate.EngineConfig` of the model flags."""
    from prag_vllm.generate import EngineConfig

    return EngineConfig(model=str(model_path(args)), dtype=args.dtype, enable_lora=enable_lora,
                        max_model_len=args.max_model_len)


def start_engine(cfg):
    """Start a :class:`~prag_vllm.generate.VLLMEngine`, its output (and its processes') into the
    log file unless ``--verbose``; the console gets one line before and one after."""
    from prag_vllm import logs

    logs.step(f"starting vLLM ({Path(cfg.model).name}, dtype {cfg.dtype}"
              f"{', LoRA' if cfg.enable_lora else ''}){logs.details_hint()}")
    t0 = time.perf_counter()
    with logs.engine_output():
        from prag_vllm.generate import VLLMEngine

        engine = VLLMEngine(cfg)
    logs.step(f"vLLM ready in {time.perf_counter() - t0:.0f} s")
    return engine


class LazyEngine:
    """A :class:`~prag_vllm.generate.VLLMEngine` started on first use, so that a rerun with
    nothing left to do starts no engine."""

    def __init__(self, cfg):
        self.cfg = cfg
        self._engine = None

    @property
    def started(self) -> bool:
        return self._engine is not None

    def start(self):
        """Start the engine now (if not yet), e.g. before a progress bar that will need it."""
        if self._engine is None:
            self._engine = start_engine(self.cfg)
        return self._engine

    _get = start

    def generate(self, *args, **kwargs):
        return self._get().generate(*args, **kwargs)

    @property
    def tokenizer(self):
        return self._get().tokenizer

    def chat(self, *args, **kwargs):
        return self._get().chat(*args, **kwargs)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    def __enter__(self) -> LazyEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
