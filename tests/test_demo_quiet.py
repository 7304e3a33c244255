"""Quiet by default: the console gets steps, progress bars and results; vLLM's, the libraries'
and the child processes' output goes to ``<work-dir>/prag.log`` unless ``--verbose``.
And ``prag demo`` runs in one process with one engine (here a fake one), resumable.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from prag_vllm.demo_data import DOCUMENTS, QUESTIONS

ENV_KEYS = ("VLLM_LOGGING_STREAM", "PRAG_LOG_PID", "HF_HUB_DISABLE_PROGRESS_BARS")


def _python(code: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=timeout)


# A stand-in for an engine start: vLLM's handler as vLLM builds it (from VLLM_LOGGING_STREAM), a
# child process writing to its stdout and stderr, a deprecation warning, a library's own handler.
ENGINE_LIKE = """
    import logging, logging.config, os, subprocess, sys, warnings
    from prag_vllm import logs

    before = {k: os.environ.get(k) for k in __ENV_KEYS__}
    logs.setup(sys.argv[1], verbose=sys.argv[2] == "1")
    logs.step("step one")
    with logs.engine_output():
        logging.config.dictConfig({"version": 1, "disable_existing_loggers": False,
            "handlers": {"v": {"class": "logging.StreamHandler",
                               "stream": os.environ.get("VLLM_LOGGING_STREAM", "ext://sys.stdout")}},
            "loggers": {"vllm": {"handlers": ["v"], "level": "INFO", "propagate": False}}})
        logging.getLogger("vllm.engine").info("ENGINE INFO line")
        subprocess.run([sys.executable, "-c",
                        "import sys; print('CHILD stdout line'); sys.stderr.write('CHILD stderr line' + chr(10))"])
        t = logging.getLogger("transformers")
        t.addHandler(logging.StreamHandler(sys.stderr)); t.propagate = False
    warnings.warn("DEPRECATED thing", FutureWarning)
    logging.getLogger("transformers").warning("LIBRARY warning")
    logging.getLogger("prag_vllm.x").info("OWN info")
    for i in range(3):  # one per document, say: shown once, then a pointer to the log
        logging.getLogger("prag_vllm.x").warning("OWN warning %d", i)
    logging.getLogger("urllib3").error("LIBRARY error")
    print("RESULT")
    logs.teardown()
    assert {k: os.environ.get(k) for k in before} == before
    print("RESTORED")
""".replace("__ENV_KEYS__", repr(ENV_KEYS))


def test_quiet_console_and_log_file(tmp_path):
    log = tmp_path / "w" / "prag.log"
    res = _python(ENGINE_LIKE, str(log), "0")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["RESULT", "RESTORED"]
    assert res.stderr.splitlines() == ["step one", "warning: OWN warning 0",
                                       f"warning: ... more warnings like the last one in {log}", "error: LIBRARY error"]
    text = log.read_text()
    assert "Traceback" not in text and "Error:" not in text
    for needle in ("step one", "ENGINE INFO line", "CHILD stdout line", "CHILD stderr line", "DEPRECATED thing",
                   "LIBRARY warning", "OWN info", "OWN warning 2", "LIBRARY error"):
        assert needle in text, needle


def test_verbose_shows_everything(tmp_path):
    log = tmp_path / "w" / "prag.log"
    res = _python(ENGINE_LIKE, str(log), "1")
    assert res.returncode == 0, res.stderr
    console = res.stdout + res.stderr
    assert "Traceback" not in console
    for needle in ("step one", "ENGINE INFO line", "CHILD stdout line", "CHILD stderr line", "DEPRECATED thing",
                   "LIBRARY warning", "OWN info", "RESULT"):
        assert needle in console, needle


def test_real_vllm_logger_goes_to_the_log(tmp_path):
    """vLLM configures its handler from VLLM_LOGGING_STREAM when it is imported."""
    code = """
        import sys
        from prag_vllm import logs
        logs.setup(sys.argv[1], verbose=sys.argv[2] == "1")
        with logs.engine_output():
            import vllm  # noqa: F401
            from vllm.logger import init_logger
            init_logger("vllm.prag_test").info("PRAG-TEST vLLM INFO line")
        logs.teardown()
    """
    quiet = _python(code, str(tmp_path / "q" / "prag.log"), "0")
    assert quiet.returncode == 0, quiet.stderr
    assert "PRAG-TEST" not in quiet.stdout + quiet.stderr
    assert not [ln for ln in (quiet.stdout + quiet.stderr).splitlines() if " INFO " in ln], quiet.stdout + quiet.stderr
    assert "PRAG-TEST vLLM INFO line" in (tmp_path / "q" / "prag.log").read_text()
    verbose = _python(code, str(tmp_path / "v" / "prag.log"), "1")
    assert verbose.returncode == 0, verbose.stderr
    assert "PRAG-TEST vLLM INFO line" in verbose.stdout + verbose.stderr


def _prag(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prag_vllm.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_index_command_quiet_and_verbose(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in DOCUMENTS[:2]))
    res = _prag("index", "--work-dir", tmp_path / "w", "--corpus", corpus)
    assert res.returncode == 0 and res.stdout.splitlines() == [f"indexed 2 documents in {tmp_path / 'w' / 'index'}"]
    assert res.stderr == ""
    assert "INFO prag_vllm.corpus: loaded 2 documents" in (tmp_path / "w" / "prag.log").read_text()
    res = _prag("index", "--work-dir", tmp_path / "w", "--corpus", corpus, "--verbose")
    assert res.returncode == 0 and "INFO prag_vllm.corpus: loaded 2 documents" in res.stderr


class FakeEngine:
    """Augments with canned text; answers the gold answer when an adapter or passages are given."""

    def __init__(self):
        self.calls = 0
        self.gold = {q["question"]: q["answers"][0] for q in QUESTIONS}

    def chat(self, conversations, *, max_tokens, temperature=0.0, seed=None):
        self.calls += 1
        return ["Rewritten." if c[-1]["content"].startswith("Rewrite") else
                json.dumps([{"question": "Q?", "answer": "A"}]) for c in conversations]

    def generate(self, conversations, adapters=None, *, max_tokens=32, **kw):
        from prag_vllm.generate import Generation

        self.calls += 1
        outs = []
        for conv, adapter in zip(conversations, adapters or [None] * len(conversations)):
            text = conv[-1]["content"]
            gold = next((a for q, a in self.gold.items() if q in text), "?")
            knows = adapter is not None or "Passage" in text or len(text) > 200
            outs.append(Generation(text=gold if knows else "No idea", token_ids=[1, 2], prompt_tokens=len(text) // 4,
                                   finish_reason="stop"))
        return outs


def test_demo_one_process_resumable(tiny_model_dir, tmp_path, capsys):
    from prag_vllm.demo import run_demo
    from prag_vllm.parameterize import TrainConfig
    from prag_vllm.workspace import Workspace

    ws = Workspace.at(tmp_path / "demo")
    train = TrainConfig(epochs=1, max_length=128)
    engine = FakeEngine()
    assert run_demo(ws, "tiny", train, model_dir=tiny_model_dir, engine=engine) == 0
    out = capsys.readouterr().out
    rows = [json.loads(ln) for ln in (ws.root / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == len(QUESTIONS) * 5 and engine.calls > 0
    assert "| parametric |" in out and (ws.root / "demo_table.md").is_file()
    assert f"(closed-book wrong): {len(QUESTIONS)}/{len(QUESTIONS)}" in out
    assert len(list((ws.store(tiny_model_dir, train).root / "docs").iterdir())) == len(DOCUMENTS)
    again = FakeEngine()
    assert run_demo(ws, "tiny", train, model_dir=tiny_model_dir, engine=again) == 0
    assert again.calls == 0, "a finished demo is resumed, not redone"
    assert out.split("total")[1] == capsys.readouterr().out.split("total")[1]
    assert run_demo(ws, "tiny", train, model_dir=tiny_model_dir, answer=False, engine=again) == 0  # make serve
    assert again.calls == 0
    # other answering settings: the answers of before are kept aside, not reused
    other = FakeEngine()
    assert run_demo(ws, "tiny", train, model_dir=tiny_model_dir, engine=other, merge_policy="sum") == 0
    assert other.calls > 0 and len(list(ws.root.glob("answers-before-*.jsonl"))) == 1
    assert json.loads((ws.root / "answers.settings.json").read_text())["merge_policy"] == "sum"


def test_demo_offline_only_first_run(tiny_model_dir, tmp_path):
    """``prag demo --offline-only`` (what ``make serve`` runs first): index, augment, train; no answers."""
    from prag_vllm.demo import run_demo
    from prag_vllm.parameterize import TrainConfig
    from prag_vllm.workspace import Workspace

    ws = Workspace.at(tmp_path / "demo")
    train = TrainConfig(epochs=1, max_length=128)
    engine = FakeEngine()
    assert run_demo(ws, "tiny", train, model_dir=tiny_model_dir, answer=False, engine=engine) == 0
    assert engine.calls > 0 and ws.augmented.is_file() and (ws.root / "index").is_dir()
    assert not (ws.root / "answers.jsonl").exists()
    assert len(list((ws.store(tiny_model_dir, train).root / "docs").iterdir())) == len(DOCUMENTS)
