"""``prag eval`` end to end on the shared SmolLM2 engine: 3 HotpotQA questions, top-1, 1 epoch."""

import json

import pytest

from conftest import SHARED_DATA
from prag_vllm.augment import AugmentConfig
from prag_vllm.evaluation import EvalConfig, run_eval
from prag_vllm.metrics import best_scores
from prag_vllm.parameterize import TrainConfig

pytestmark = pytest.mark.vllm


class CountingEngine:
    """The shared engine, counting the calls that reach it."""

    def __init__(self, engine):
        self.engine, self.cfg, self.calls = engine, engine.cfg, 0

    def generate(self, *args, **kwargs):
        self.calls += 1
        return self.engine.generate(*args, **kwargs)

    def chat(self, *args, **kwargs):
        self.calls += 1
        return self.engine.chat(*args, **kwargs)


def _snapshot(out):
    files = {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*")
             if p.is_file() and ("adapters" in p.parts or "augmented" in p.parts or "runs" in p.parts)}
    return files, (out / "timings.json").read_text()


def test_eval_end_to_end_and_resume(vllm_engine, tmp_path):
    raw = json.loads((SHARED_DATA / "hotpotqa" / "dev_distractor_sample.json").read_text())
    data = tmp_path / "hotpot_dev_slice.json"
    data.write_text(json.dumps(raw[:4]))  # 4 questions' paragraphs make the corpus; 3 are evaluated
    out = tmp_path / "eval"
    cfg = EvalConfig(datasets=[str(data)], out_dir=out, limit=3, modes=["standard", "parametric"], top_k=1,
                     train=TrainConfig(epochs=1), augment=AugmentConfig(n_qa=1, max_retries=0, max_tokens=64), max_tokens=16)
    engine = CountingEngine(vllm_engine)
    metrics = run_eval(cfg, engine)
    assert engine.calls > 0

    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {r["mode"] for r in rows} == {"standard", "parametric"}
    assert all(r["dataset"] == "hotpotqa" and r["type"] in ("bridge", "comparison") and len(r["retrieved"]) == 1
               and r["latency_s"] > 0 and "f1" in r for r in rows)
    para = [r for r in rows if r["mode"] == "parametric"]
    assert all(r["init"] == "random" and r["recipe"] == "default" and r["parametric"] == r["retrieved"] and not r["in_context"] for r in para)

    ds = metrics["datasets"]["hotpotqa"]
    assert ds["questions"] == 3 and ds["offline"]["documents"] >= 1
    assert [s["label"] for s in ds["rows"]] == ["standard", "parametric"]
    for r in rows:  # each row scored against its gold answers
        assert (r["em"], r["f1"]) == best_scores(r["answer"], r["answers"])
    for s in ds["rows"]:  # each table row: the mean over its mode's rows
        mine = [r for r in rows if r["mode"] == s["mode"]]
        assert s["n"]["total"] == len(mine) == 3
        assert s["f1"]["total"] == pytest.approx(sum(r["f1"] for r in mine) / 3)
        assert s["em"]["total"] == pytest.approx(sum(r["em"] for r in mine) / 3)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["datasets"]["hotpotqa"]["rows"][0]["f1"] == ds["rows"][0]["f1"]
    assert saved["timings"]["hotpotqa"]["train"]["default"]["random"]["docs"] == ds["offline"]["documents"]

    report = (out / "report.md").read_text()
    assert "## F1 (layout of the paper's Table 1)" in report and "hotpotqa total (n=3)" in report
    assert "speed-up vs standard" in report and "| parametric |" in report and "1.00×" in report
    assert [(c["a"], c["b"]) for c in saved["comparisons"]] == [("parametric", "standard")]
    assert saved["comparisons"][0]["n"] == 3 and "## Differences" in report
    for png in ("f1.png", "latency.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stores = list((out / "work" / "hotpotqa" / "adapters").glob("*/default-r2-e1-random-*"))
    assert len(stores) == 1 and (stores[0] / "train_config.json").is_file()

    # a rerun of the same command redoes nothing: no engine call, no file rewritten, same rows
    before = _snapshot(out)
    again = CountingEngine(vllm_engine)
    run_eval(cfg, again)
    assert again.calls == 0
    assert _snapshot(out) == before
    assert [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()] == rows
