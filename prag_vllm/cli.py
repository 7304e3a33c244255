"""The ``prag`` command: one subcommand per step of Parametric RAG, plus ``demo``.

Every subcommand validates its inputs before any model is loaded and reports bad input
as one line on stderr with exit code 2. The console gets steps, progress bars and
results; vLLM's and the libraries' messages go to ``<work-dir>/prag.log`` unless
``--verbose`` (:mod:`prag_vllm.logs`). Argument types shared with the other command
modules live in :mod:`prag_vllm.cliargs`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from prag_vllm import logs
from prag_vllm.cliargs import (
    PragParser,
    add_merge_policy_argument,
    add_model_arguments,
    add_verbose_argument,
    engine_config,
    model_path,
    modes,
    positive,
    top_k,
)
from prag_vllm.errors import InputError, PragError

logger = logging.getLogger(__name__)


def cmd_models(args) -> int:
    from prag_vllm.models import DEFAULT_MODEL, REGISTRY, TEST_MODEL, cache_dir

    for name, spec in REGISTRY.items():
        tag = " (default)" if name == DEFAULT_MODEL else " (tests)" if name == TEST_MODEL else ""
        cached = (cache_dir() / "models" / name / "config.json").is_file()
        print(f"{name}{tag}\t{'cached' if cached else 'not fetched'}\t{spec.description}")
    return 0


def cmd_fetch_model(args) -> int:
    print(model_path(args))
    return 0


def cmd_index(args) -> int:
    from prag_vllm.corpus import load_corpus
    from prag_vllm.retrieve.factory import build_retriever, describe, retriever_config_from_args

    cfg = retriever_config_from_args(args, args.ws.index_dir)
    retriever = build_retriever(cfg, load_corpus(args.corpus))
    print(f"indexed {len(retriever)} documents in {describe(cfg)}")
    return 0


def cmd_augment(args) -> int:
    from prag_vllm.executors import executor_config_from_args
    from prag_vllm.offline_commands import executor_engine, run_augment

    executor = executor_config_from_args(args)  # checked before any work
    return run_augment(args, lambda: executor_engine(executor, engine_config(args, enable_lora=False)))


def cmd_parameterize(args) -> int:
    from prag_vllm.offline_commands import run_parameterize

    return run_parameterize(args, lambda: model_path(args))


def cmd_merge(args) -> int:
    from prag_vllm.adapters import AdapterStore
    from prag_vllm.merge import merge_adapters

    store = AdapterStore(args.store) if args.store else args.ws.store(model_path(args))
    missing = [d for d in args.doc_id if not store.has(d)]
    if missing:
        raise InputError(f"no adapter for document(s) {missing} in {store.root}")
    merged = merge_adapters([store.load(d) for d in args.doc_id], policy=args.merge_policy)
    merged.meta["doc_ids"] = args.doc_id
    merged.save(args.out)
    print(f"merged {len(args.doc_id)} adapters into one rank-{merged.r} adapter at {args.out}")
    return 0


def cmd_answer(args) -> int:
    from prag_vllm.augment import load_augmentations
    from prag_vllm.corpus import load_corpus
    from prag_vllm.executors import executor_config_from_args
    from prag_vllm.offline_commands import executor_engine, train_config_from_args
    from prag_vllm.pipeline import ParametricRAG, format_table, load_questions, summarize
    from prag_vllm.retrieve.factory import retriever_from_args

    executor = executor_config_from_args(args)
    questions = load_questions(args.questions)
    retriever = retriever_from_args(args, load_corpus(args.corpus), args.ws.index_dir)
    with executor_engine(executor, engine_config(args)) as engine:
        store = args.ws.store(model_path(args), train_config_from_args(args) if args.recipe else None)
        rag = ParametricRAG(retriever, store, engine,
                            load_augmentations(args.ws.augmented), default_k=args.top_k,
                            merge_policy=args.merge_policy)
        rows = rag.answer_file(questions, args.out, args.mode, batch_size=args.batch_size,
                               max_tokens=args.max_tokens)
    print(format_table(summarize(rows)))
    return 0


def cmd_serve(args) -> int:
    from serving.server import serve

    cfg = args.server_config  # validated by _log_file, before anything was written
    logs.step(f"starting the server: vLLM first, then http://{cfg.host}:{cfg.port}/v1{logs.details_hint()}")
    with logs.server_output():
        return serve(cfg)


def cmd_demo(args) -> int:
    from prag_vllm.demo import run_demo
    from prag_vllm.offline_commands import train_config_from_args

    train = train_config_from_args(args)  # bad recipe settings fail here, before any step runs
    return run_demo(args.ws, args.model, train, dtype=args.dtype, max_model_len=args.max_model_len,
                    answer=not args.offline_only, model_dir=getattr(args, "model_path", None),
                    merge_policy=args.merge_policy)


def build_parser() -> argparse.ArgumentParser:
    """The ``prag`` parser: every subcommand, its flags and handler (``func``)."""
    from prag_vllm.benchdata.cli import add_parser as add_bench_data_command
    from prag_vllm.evaluation.cli import add_eval_command
    from prag_vllm.executors import add_executor_arguments
    from prag_vllm.offline_commands import add_parameterize_arguments, add_recipe_arguments, add_shard_argument
    from prag_vllm.retrieve.factory import add_retriever_arguments
    from serving.config import add_arguments as add_server_arguments

    p = PragParser(prog="prag", description="Parametric RAG on vLLM")
    add_verbose_argument(p, top_level=True)
    sub = p.add_subparsers(dest="command", required=True, parser_class=PragParser)

    def add(name, func, help, model=True, corpus=True):
        sp = sub.add_parser(name, help=help)
        sp.set_defaults(func=func)
        add_verbose_argument(sp)
        sp.add_argument("--work-dir", default="prag-work", help="workspace for index, augmentations, adapters")
        if corpus:
            sp.add_argument("--corpus", required=True, help="JSON Lines (id,title,text) or a HotpotQA/2Wiki JSON file")
        if model:
            add_model_arguments(sp)
        return sp

    sub.add_parser("models", help="list known models").set_defaults(func=cmd_models, work_dir=None, model=None)
    add("fetch-model", cmd_fetch_model, "fetch and convert a model into the cache", corpus=False)
    add_retriever_arguments(add("index", cmd_index, "build the BM25 index of a corpus", model=False))
    sp = add("augment", cmd_augment, "rewrite documents and generate QA pairs (vLLM, batched)")
    sp.add_argument("--n-rewrites", type=int, default=1)
    sp.add_argument("--n-qa", type=int, default=3)
    sp.add_argument("--batch-size", type=positive, default=32)
    sp.add_argument("--limit", type=positive, default=None, help="only the first N documents")
    add_shard_argument(sp)
    add_executor_arguments(sp)
    sp = add("parameterize", cmd_parameterize, "train one LoRA per document into the adapter store")
    add_recipe_arguments(sp)
    sp.add_argument("--train-batch-size", type=positive, default=1)
    sp.add_argument("--warmup-adapter", default=None, help="PEFT adapter dir to initialise from")
    sp.add_argument("--no-augmentation", action="store_true", help="train on the raw passages if not augmented")
    sp.add_argument("--limit", type=positive, default=None, help="only the first N documents")
    add_parameterize_arguments(sp)
    add_executor_arguments(sp, trains=True)
    sp = add("merge", cmd_merge, "merge per-document adapters into one PEFT adapter", corpus=False)
    sp.add_argument("--doc-id", action="append", required=True)
    sp.add_argument("--store", default=None, help="adapter store (default: the workspace's for --model)")
    sp.add_argument("--out", required=True)
    add_merge_policy_argument(sp)
    sp = add("answer", cmd_answer, "answer a JSON Lines file of questions")
    add_retriever_arguments(sp)
    sp.add_argument("--questions", required=True)
    sp.add_argument("--out", required=True, help="output JSON Lines (appended to; resumable)")
    sp.add_argument("--mode", type=modes, default=["parametric"], help="comma-separated modes or 'all'")
    sp.add_argument("--top-k", type=top_k, default=3)
    add_merge_policy_argument(sp)
    sp.add_argument("--batch-size", type=positive, default=64)
    sp.add_argument("--max-tokens", type=positive, default=32)
    add_recipe_arguments(sp)
    add_executor_arguments(sp)
    sp.set_defaults(recipe=None)  # answer: the workspace's only adapter set unless a recipe is named
    sp = sub.add_parser("serve", help="the OpenAI-compatible server (same flags as `python -m serving`)")
    sp.set_defaults(func=cmd_serve)
    add_verbose_argument(sp)
    add_server_arguments(sp)
    sp = add("demo", cmd_demo, "the end-to-end demo on an invented corpus", corpus=False)
    sp.set_defaults(work_dir="runs/demo")
    add_recipe_arguments(sp)
    add_merge_policy_argument(sp)
    sp.add_argument("--offline-only", action="store_true", help="index, augment and parameterize; answer nothing")
    add_eval_command(sub)
    add_bench_data_command(sub)
    for sp in sub.choices.values():
        if not any("--verbose" in a.option_strings for a in sp._actions):
            add_verbose_argument(sp)
    return p


def _log_file(args) -> Path | None:
    """Where the command's log goes: its work directory (``eval``: its ``--out``), or nowhere for
    the commands that have none. ``serve``: its configuration is validated here."""
    if args.command == "serve":
        from serving.config import config_from_args

        args.server_config = config_from_args(args)
        cfg = args.server_config
        return Path(cfg.log_file) if cfg.log_file else Path(cfg.work_dir) / logs.LOG_NAME
    if args.command == "eval":
        return Path(args.out) / logs.LOG_NAME
    if args.command in ("models", "fetch-model", "bench-data") or getattr(args, "store", None):
        return None
    return args.ws.root / logs.LOG_NAME if getattr(args, "ws", None) is not None else None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from prag_vllm.workspace import Workspace

        if getattr(args, "work_dir", None):
            args.ws = Workspace.at(args.work_dir)
        if getattr(args, "model", None):
            from prag_vllm.models import REGISTRY, resolve_model

            if args.model not in REGISTRY:  # a local directory: check it now; registry models are fetched lazily
                args.model_path = resolve_model(args.model, fetch=False)
        with logs.session(_log_file(args), verbose=args.verbose):
            return args.func(args)
    except PragError as exc:
        where = logs.log_path_of_last_session()
        print(f"prag: error: {exc}" + (f" (details in {where})" if where and not isinstance(exc, InputError) else ""),
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prag: interrupted (re-run the same command to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
