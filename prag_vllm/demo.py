"""``prag demo``: the whole pipeline on an invented corpus, in all five modes.

Each step runs as its own ``prag`` process (as a user would run them), so the vLLM
engine of one step is gone before the next step trains or serves. Steps resume:
re-running the demo reuses the augmentations and adapters already made.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time

from prag_vllm.demo_data import DOCUMENTS, QUESTIONS
from prag_vllm.fileio import atomic_write_text, read_jsonl
from prag_vllm.modes import MODES
from prag_vllm.workspace import Workspace

logger = logging.getLogger(__name__)


def _step(*argv: str) -> None:
    cmd = [sys.executable, "-m", "prag_vllm.cli", *argv]
    logger.info("demo step: prag %s", " ".join(argv))
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    logger.info("demo step done in %.0f s", time.perf_counter() - t0)


def run_demo(ws: Workspace, model: str, recipe: list[str] | None = None, dtype: str = "auto",
             answer: bool = True) -> int:
    """All steps; with ``answer=False`` only the offline ones (what ``make serve`` needs)."""
    from prag_vllm.pipeline import format_table, summarize

    ws.root.mkdir(parents=True, exist_ok=True)
    corpus, questions, answers = ws.root / "corpus.jsonl", ws.root / "questions.jsonl", ws.root / "answers.jsonl"
    atomic_write_text(corpus, "".join(json.dumps(d) + "\n" for d in DOCUMENTS))
    atomic_write_text(questions, "".join(json.dumps(q) + "\n" for q in QUESTIONS))
    common = ["--work-dir", str(ws.root), "--corpus", str(corpus), "--model", model]
    t0 = time.perf_counter()
    _step("index", "--work-dir", str(ws.root), "--corpus", str(corpus))
    _step("augment", *common, "--dtype", dtype)
    recipe = recipe or []
    _step("parameterize", *common, *recipe)
    if not answer:
        print(f"demo workspace ready in {ws.root} (index, augmentations, adapters)")
        return 0
    _step("answer", *common, *recipe, "--dtype", dtype, "--questions", str(questions), "--out", str(answers),
          "--mode", "all")
    rows = read_jsonl(answers)
    table = format_table(summarize(rows, list(MODES)))
    print(f"\nDemo: {len(DOCUMENTS)} invented documents, {len(QUESTIONS)} questions, model {model}, "
          f"top-k 3, {time.perf_counter() - t0:.0f} s total\n")
    print(table)
    para = [r for r in rows if r["mode"] == "parametric"]
    closed = {r["id"]: r for r in rows if r["mode"] == "closed-book"}
    wins = [r for r in para if r.get("em") and not r["in_context"] and not closed[r["id"]].get("em")]
    print(f"\nParametric answers correct with no passage in the prompt (closed-book wrong): {len(wins)}/{len(para)}")
    for r in wins[:5]:
        print(f"  {r['question']} -> {r['answer']!r} (closed-book: {closed[r['id']]['answer']!r})")
    atomic_write_text(ws.root / "demo_table.md", table + "\n")
    return 0
