"""The ``prag`` command: one subcommand per step of Parametric RAG, plus ``demo``.

Every subcommand validates its inputs before any model is loaded and reports bad input
as one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from prag_vllm.errors import InputError, PragError

logger = logging.getLogger(__name__)


def _top_k(text: str) -> int:
    from prag_vllm.retrieve import check_top_k

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"top-k must be an integer, got {text!r}") from None
    try:
        return check_top_k(value)
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _modes(text: str) -> list[str]:
    from prag_vllm.modes import MODES, get_mode

    names = list(MODES) if text == "all" else [m.strip() for m in text.split(",") if m.strip()]
    for m in names:
        try:
            get_mode(m)
        except InputError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return names


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _model_path(args) -> Path:
    """Resolve (and fetch on first use) the model -- only after the inputs were validated."""
    from prag_vllm.models import resolve_model

    if getattr(args, "model_path", None) is None:
        args.model_path = resolve_model(args.model)
    return args.model_path


def _engine(args, enable_lora: bool = True):
    from prag_vllm.generate import EngineConfig, VLLMEngine

    return VLLMEngine(EngineConfig(model=str(_model_path(args)), dtype=args.dtype, enable_lora=enable_lora,
                                   max_model_len=args.max_model_len))


def cmd_models(args) -> int:
    from prag_vllm.models import DEFAULT_MODEL, REGISTRY, TEST_MODEL, cache_dir

    for name, spec in REGISTRY.items():
        tag = " (default)" if name == DEFAULT_MODEL else " (tests)" if name == TEST_MODEL else ""
        cached = (cache_dir() / "models" / name / "config.json").is_file()
        print(f"{name}{tag}\t{'cached' if cached else 'not fetched'}\t{spec.description}")
    return 0


def cmd_fetch_model(args) -> int:
    print(_model_path(args))
    return 0


def cmd_index(args) -> int:
    from prag_vllm.corpus import load_corpus
    from prag_vllm.retrieve.factory import build_retriever, describe, retriever_config_from_args

    cfg = retriever_config_from_args(args, args.ws.index_dir)
    retriever = build_retriever(cfg, load_corpus(args.corpus))
    print(f"indexed {len(retriever)} documents in {describe(cfg)}")
    return 0


def cmd_augment(args) -> int:
    from prag_vllm.offline_commands import run_augment

    return run_augment(args, lambda: _engine(args, enable_lora=False))


def cmd_parameterize(args) -> int:
    from prag_vllm.offline_commands import run_parameterize

    return run_parameterize(args, lambda: _model_path(args))


def cmd_merge(args) -> int:
    from prag_vllm.adapters import AdapterStore
    from prag_vllm.merge import merge_adapters

    store = AdapterStore(args.store) if args.store else args.ws.store(_model_path(args))
    missing = [d for d in args.doc_id if not store.has(d)]
    if missing:
        raise InputError(f"no adapter for document(s) {missing} in {store.root}")
    merged = merge_adapters([store.load(d) for d in args.doc_id])
    merged.meta = {"kind": "merged", "doc_ids": args.doc_id}
    merged.save(args.out)
    print(f"merged {len(args.doc_id)} adapters into one rank-{merged.r} adapter at {args.out}")
    return 0


def cmd_answer(args) -> int:
    from prag_vllm.augment import load_augmentations
    from prag_vllm.corpus import load_corpus
    from prag_vllm.offline_commands import train_config_from_args
    from prag_vllm.pipeline import ParametricRAG, format_table, load_questions, summarize
    from prag_vllm.retrieve.factory import retriever_from_args

    questions = load_questions(args.questions)
    retriever = retriever_from_args(args, load_corpus(args.corpus), args.ws.index_dir)
    with _engine(args) as engine:
        store = args.ws.store(_model_path(args), train_config_from_args(args) if args.recipe else None)
        rag = ParametricRAG(retriever, store, engine,
                            load_augmentations(args.ws.augmented), default_k=args.top_k)
        rows = rag.answer_file(questions, args.out, args.mode, batch_size=args.batch_size,
                               max_tokens=args.max_tokens)
    print(format_table(summarize(rows)))
    return 0


def cmd_serve(args) -> int:
    from serving.config import config_from_args
    from serving.server import serve

    return serve(config_from_args(args))


def cmd_demo(args) -> int:
    from prag_vllm.demo import run_demo

    from prag_vllm.offline_commands import train_config_from_args

    train_config_from_args(args)  # bad recipe settings fail here, before any step runs
    recipe = ["--recipe", args.recipe] + (["--loss-policy", args.loss_policy] if args.loss_policy else [])
    recipe += (["--epochs", str(args.epochs)] if args.epochs else []) + (["--lr", str(args.lr)] if args.lr is not None else [])
    return run_demo(args.ws, args.model, recipe, dtype=args.dtype, answer=not args.offline_only)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``prag: error: ...``), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"prag: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from prag_vllm.generate import DTYPES
    from prag_vllm.models import DEFAULT_MODEL
    from prag_vllm.offline_commands import add_parameterize_arguments, add_recipe_arguments, add_shard_argument
    from prag_vllm.retrieve.factory import add_retriever_arguments

    p = _Parser(prog="prag", description="Parametric RAG on vLLM")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add(name, func, help, model=True, corpus=True):
        sp = sub.add_parser(name, help=help)
        sp.set_defaults(func=func)
        sp.add_argument("--work-dir", default="prag-work", help="workspace for index, augmentations, adapters")
        if corpus:
            sp.add_argument("--corpus", required=True, help="JSON Lines (id,title,text) or a HotpotQA/2Wiki JSON file")
        if model:
            sp.add_argument("--model", default=DEFAULT_MODEL, help="registry name or local HF model directory")
            sp.add_argument("--dtype", default="auto", choices=DTYPES,
                            help="auto: bfloat16 where native (AVX512-BF16/AMX/GPU), else float32")
            sp.add_argument("--max-model-len", type=_positive, default=4096)
        return sp

    sub.add_parser("models", help="list known models").set_defaults(func=cmd_models, work_dir=None, model=None)
    add("fetch-model", cmd_fetch_model, "fetch and convert a model into the cache", corpus=False)
    add_retriever_arguments(add("index", cmd_index, "build the BM25 index of a corpus", model=False))
    sp = add("augment", cmd_augment, "rewrite documents and generate QA pairs (vLLM, batched)")
    sp.add_argument("--n-rewrites", type=int, default=1)
    sp.add_argument("--n-qa", type=int, default=3)
    sp.add_argument("--batch-size", type=_positive, default=32)
    sp.add_argument("--limit", type=_positive, default=None, help="only the first N documents")
    add_shard_argument(sp)
    sp = add("parameterize", cmd_parameterize, "train one LoRA per document into the adapter store")
    add_recipe_arguments(sp)
    sp.add_argument("--train-batch-size", type=_positive, default=1)
    sp.add_argument("--warmup-adapter", default=None, help="PEFT adapter dir to initialise from")
    sp.add_argument("--no-augmentation", action="store_true", help="train on the raw passages if not augmented")
    sp.add_argument("--limit", type=_positive, default=None, help="only the first N documents")
    add_parameterize_arguments(sp)
    sp = add("merge", cmd_merge, "merge per-document adapters into one PEFT adapter", corpus=False)
    sp.add_argument("--doc-id", action="append", required=True)
    sp.add_argument("--store", default=None, help="adapter store (default: the workspace's for --model)")
    sp.add_argument("--out", required=True)
    sp = add("answer", cmd_answer, "answer a JSON Lines file of questions")
    add_retriever_arguments(sp)
    sp.add_argument("--questions", required=True)
    sp.add_argument("--out", required=True, help="output JSON Lines (appended to; resumable)")
    sp.add_argument("--mode", type=_modes, default=["parametric"], help="comma-separated modes or 'all'")
    sp.add_argument("--top-k", type=_top_k, default=3)
    sp.add_argument("--batch-size", type=_positive, default=64)
    sp.add_argument("--max-tokens", type=_positive, default=32)
    add_recipe_arguments(sp)
    sp.set_defaults(recipe=None)  # answer: the workspace's only adapter set unless a recipe is named
    from serving.config import add_arguments

    sp = sub.add_parser("serve", help="the OpenAI-compatible server (same flags as `python -m serving`)")
    sp.set_defaults(func=cmd_serve)
    add_arguments(sp)
    sp = add("demo", cmd_demo, "the end-to-end demo on an invented corpus", corpus=False)
    sp.set_defaults(work_dir="runs/demo")
    add_recipe_arguments(sp)
    sp.add_argument("--offline-only", action="store_true", help="index, augment and parameterize; answer nothing")
    from prag_vllm.evaluation.cli import add_eval_command

    add_eval_command(sub)
    from prag_vllm.benchdata.cli import add_parser as add_bench_data_command

    add_bench_data_command(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    try:
        from prag_vllm.workspace import Workspace

        if getattr(args, "work_dir", None):
            args.ws = Workspace.at(args.work_dir)
        if getattr(args, "model", None):
            from prag_vllm.models import REGISTRY, resolve_model

            if args.model not in REGISTRY:  # a local directory: check it now; registry models are fetched lazily
                args.model_path = resolve_model(args.model, fetch=False)
        return args.func(args)
    except PragError as exc:
        print(f"prag: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prag: interrupted (re-run the same command to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
