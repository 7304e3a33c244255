"""``prag bench-data``: generate benchmark data sets (registered by :mod:`prag_vllm.cli`).

``prag bench-data fictional --docs N --seed S --out DIR [--questions M]`` writes
``DIR/corpus.jsonl``, ``DIR/questions.jsonl`` and ``DIR/meta.json``; bad input is one line
``prag: error: ...`` with exit code 2, and then nothing is written. :func:`main` runs the
same command without the rest of ``prag`` (``python -m prag_vllm.benchdata.cli fictional ...``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from prag_vllm.errors import PragError


def add_parser(subparsers) -> None:
    """Add the ``bench-data`` subcommand (with its ``fictional`` generator) to ``prag``'s sub-parsers."""
    from prag_vllm.benchdata.fictional import MAX_DOCS, MIN_DOCS, SEED_CLASSES

    sp = subparsers.add_parser("bench-data", help="generate benchmark data (a fictional-knowledge corpus + questions)")
    kinds = sp.add_subparsers(dest="bench_data", required=True, parser_class=type(sp))
    fp = kinds.add_parser("fictional", help="invented towns, people, organisations and works; single- and two-hop "
                                            "questions no model can answer from memory")
    fp.set_defaults(func=cmd_fictional)
    fp.add_argument("--docs", type=int, required=True, help=f"number of documents ({MIN_DOCS}..{MAX_DOCS})")
    fp.add_argument("--seed", type=int, default=0,
                    help=f"0..{SEED_CLASSES - 1}; different seeds never share a name (default 0)")
    fp.add_argument("--out", required=True, help="new (or empty) output directory")
    fp.add_argument("--questions", type=int, default=None, help="number of questions (default: 2 x --docs)")


def cmd_fictional(args) -> int:
    from prag_vllm.benchdata.fictional import check_args, generate, write

    check_args(args.docs, args.seed, args.questions)
    fset = generate(args.docs, args.seed, args.questions)
    out = write(fset, Path(args.out))
    by_type = fset.meta["questions_by_type"]
    print(f"wrote {len(fset.documents)} documents and {len(fset.questions)} questions "
          f"({by_type['single-hop']} single-hop, {by_type['two-hop']} two-hop) to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``prag bench-data`` on its own: the exit code (2 and one line ``prag: error: ...`` on bad input)."""
    from prag_vllm.cliargs import PragParser

    parser = PragParser(prog="prag", description="generate benchmark data")
    add_parser(parser.add_subparsers(dest="command", required=True, parser_class=PragParser))
    try:
        args = parser.parse_args(["bench-data", *(sys.argv[1:] if argv is None else argv)])
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.func(args)
    except PragError as exc:
        print(f"prag: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
