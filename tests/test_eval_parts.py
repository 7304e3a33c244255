"""Parts of ``prag eval`` that need no vLLM: adapter-set keys, warm-up LoRA, report, bad input."""

import json
from dataclasses import replace

import pytest

from conftest import AUGS, DOCS, random_adapter
from prag_vllm.cli import main
from prag_vllm.errors import InputError
from prag_vllm.evaluation.report import row_specs, write_outputs
from prag_vllm.evaluation.run import EvalConfig, _check_settings, prepare
from prag_vllm.evaluation.warmup import train_warmup_adapter, warmup_pairs
from prag_vllm.parameterize import DocumentTrainer, TrainConfig, parameterize_corpus
from prag_vllm.pipeline import Question
from prag_vllm.workspace import Workspace, training_key

HOT = [{"_id": f"h{i}", "question": f"Question number {i}?", "answer": f"answer {i}",
        "type": "bridge" if i % 3 else "comparison", "level": "easy", "supporting_facts": [],
        "context": [[f"Title {i}", [f"Paragraph {i} says answer {i}."]]]} for i in range(6)]


@pytest.fixture
def hotpot_file(tmp_path):
    path = tmp_path / "hotpot.json"
    path.write_text(json.dumps(HOT))
    return path


def test_adapter_sets_keyed_by_training_settings(tmp_path, tiny_model_dir):
    ws = Workspace.at(tmp_path / "ws")
    a = ws.store(tiny_model_dir, TrainConfig(epochs=1))
    assert a.root == ws.store(tiny_model_dir, TrainConfig(epochs=1)).root
    assert a.root != ws.store(tiny_model_dir, TrainConfig(epochs=3)).root
    assert a.root != ws.store(tiny_model_dir, TrainConfig(epochs=1, lr=1e-4)).root
    warm = random_adapter(tiny_model_dir, seed=1).save(tmp_path / "warm")
    w = ws.store(tiny_model_dir, TrainConfig(epochs=1, warmup_adapter=str(warm)))
    assert w.root != a.root and "-warmup-" in w.root.name and a.root.name.startswith("default-r2-e1-random-")
    assert json.loads((w.root / "train_config.json").read_text())["init"].startswith("warmup:")
    assert ws.store(tiny_model_dir, replace(TrainConfig(epochs=1), seed=0)).root == a.root
    # answering without settings: the default config's set among several (and the only one when alone)
    assert ws.store(tiny_model_dir).root.name == training_key(TrainConfig())
    solo = Workspace.at(tmp_path / "solo")
    only = solo.store(tiny_model_dir, TrainConfig(epochs=5))
    assert solo.store(tiny_model_dir).root == only.root


def test_warmup_pairs_exclude_evaluated():
    pool_a = [Question("1", "Who?", ["A"]), Question("2", "What?", ["B"]), Question("3", "No gold?", [])]
    pool_b = [Question("1", "WHO?!", ["C"]), Question("9", "Where?", ["D"])]
    pairs = warmup_pairs([pool_a, pool_b], evaluated=[Question("x", "who", ["A"])], size=10)
    assert pairs == [("What?", "B"), ("Where?", "D")]
    assert len(warmup_pairs([pool_a, pool_b], [], size=2)) == 2


def test_warmup_adapter_trains_once_and_inits_documents(tmp_path, tiny_model_dir):
    cfg = TrainConfig(epochs=1, precision="float32")
    pairs = [("Who designed the bridge?", "Odile Brask"), ("Where was she born?", "Ostrevik")] * 3
    out = tmp_path / "warm"
    first = train_warmup_adapter(pairs, tiny_model_dir, cfg, out, epochs=1)
    assert first["trained"] and first["tokens"] > 0 and (out / "adapter_model.safetensors").is_file()
    mtime = (out / "adapter_model.safetensors").stat().st_mtime_ns
    assert not train_warmup_adapter(pairs, tiny_model_dir, cfg, out, epochs=1)["trained"]
    assert (out / "adapter_model.safetensors").stat().st_mtime_ns == mtime
    ws = Workspace.at(tmp_path / "ws")
    stores = {}
    for init in ("random", "warmup"):
        tcfg = replace(cfg, warmup_adapter=str(out) if init == "warmup" else None)
        stores[init] = ws.store(tiny_model_dir, tcfg)
        parameterize_corpus(DOCS[:1], AUGS, stores[init], tiny_model_dir, tcfg,
                            trainer=DocumentTrainer(tiny_model_dir, tcfg))
    ra, wa = stores["random"].load("d1"), stores["warmup"].load("d1")
    assert stores["random"].root != stores["warmup"].root
    assert wa.meta["train"]["init"] == "warmup" and ra.meta["train"]["init"] == "random"


def _row(qid, mode, f1, lat, qtype):
    return {"id": qid, "question": "q", "mode": mode, "k": 1, "answer": "a", "generation": "a", "retrieved": [],
            "parametric": [], "in_context": [], "prompt_tokens": 10, "prep_s": 0.0, "latency_s": lat,
            "type": qtype, "answers": ["a"], "em": float(f1 == 1.0), "f1": f1}


def test_report_tables_and_plots_from_rows(tmp_path, hotpot_file):
    cfg = EvalConfig(datasets=[str(hotpot_file)], out_dir=tmp_path / "out", limit=4,
                     modes=["standard", "parametric"], top_k=1, inits=["random", "warmup"])
    runs = prepare(cfg)
    assert [q.id for q in runs[0].questions] == ["h0", "h1", "h2", "h3"] and runs[0].subtypes == ["bridge", "comparison"]
    types = {q.id: q.type for q in runs[0].questions}
    logs = {"base": [_row(i, "standard", 1.0, 2.0, types[i]) for i in types],
            "default-random": [_row(i, "parametric", 0.5, 1.0, types[i]) for i in types],
            "default-warmup": [_row(i, "parametric", 1.0 if types[i] == "bridge" else 0.0, 4.0, types[i])
                               for i in types]}
    logs["base"].append(_row("h5", "standard", 0.0, 9.0, "bridge"))  # not selected: must be ignored
    for tag, rows in logs.items():
        path = cfg.out_dir / "runs" / "hotpotqa" / f"{tag}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    timings = {"hotpotqa": {"augment": {"docs": 4, "seconds": 8.0},
                            "train": {"default": {"random": {"docs": 4, "seconds": 40.0},
                                                  "warmup": {"docs": 4, "seconds": 20.0}}}}}
    metrics = write_outputs(cfg, runs, cfg.out_dir, "m", timings, {"hotpotqa": 4})
    rows = {s["label"]: s for s in metrics["datasets"]["hotpotqa"]["rows"]}
    assert list(rows) == ["standard", "parametric (random)", "parametric (warmup)"]
    assert rows["standard"]["f1"] == {"bridge": 1.0, "comparison": 1.0, "total": 1.0}
    assert rows["parametric (warmup)"]["f1"] == {"bridge": 1.0, "comparison": 0.0, "total": 0.5}
    assert rows["parametric (warmup)"]["n"] == {"bridge": 2, "comparison": 2, "total": 4}
    assert metrics["datasets"]["hotpotqa"]["offline"]["train_s_per_doc"] == {"default": {"random": 10.0, "warmup": 5.0}}
    assert rows["standard"]["recipe"] is None and rows["parametric (warmup)"]["recipe"] == "default"
    assert rows["standard"]["f1_ci"]["total"] == [1.0, 1.0]
    report = (cfg.out_dir / "report.md").read_text()
    assert "| mode | hotpotqa bridge (n=2) | hotpotqa comparison (n=2) | hotpotqa total (n=4) |" in report
    assert "| parametric (warmup) | 1.000 | 0.000 | 0.500 |" in report
    assert "| parametric (random) | 1.000 | 2.00× |" in report and "| parametric (warmup) | 4.000 | 0.50× |" in report
    preds = (cfg.out_dir / "predictions.jsonl").read_text().splitlines()
    assert len(preds) == 12 and all(json.loads(p)["id"] != "h5" for p in preds)
    assert (cfg.out_dir / "f1.png").stat().st_size > 1000 and (cfg.out_dir / "latency.png").stat().st_size > 1000
    assert row_specs(["parametric", "closed-book"], ["random"]) == [("closed-book", "closed-book", None, None),
                                                                   ("parametric", "parametric", "default", "random")]
    assert [s.label for s in row_specs(["parametric"], ["random", "warmup"], ["default", "paper"])] == [
        "parametric (default, random)", "parametric (default, warmup)", "parametric (paper, random)",
        "parametric (paper, warmup)"]
    # the differences: parametric vs standard per init, warm-up vs random; intervals in metrics.json
    saved = json.loads((cfg.out_dir / "metrics.json").read_text())
    comps = {(c["a"], c["b"]): c for c in saved["comparisons"]}
    assert set(comps) == {("parametric (random)", "standard"), ("parametric (warmup)", "standard"),
                          ("parametric (warmup)", "parametric (random)")}
    c = comps["parametric (random)", "standard"]
    assert c == {"dataset": "hotpotqa", "kind": "mode", "a": "parametric (random)", "b": "standard", "metric": "f1",
                 "diff": -0.5, "ci_low": -0.5, "ci_high": -0.5, "n": 4, "level": 0.95, "distinguishable": True}
    w = comps["parametric (warmup)", "standard"]
    assert w["diff"] == -0.5 and w["ci_low"] == -1.0 and w["ci_high"] == 0.0 and not w["distinguishable"]
    assert "## Differences" in report and "not distinguishable from zero at n=4" in report
    assert "| hotpotqa | parametric (random) − standard | -0.500 | [-0.500, -0.500] | 4 | yes |" in report
    errors = {e["a"]: e for e in saved["datasets"]["hotpotqa"]["errors"]}
    assert (errors["parametric (warmup)"]["wins"], errors["parametric (warmup)"]["losses"]) == (0, 2)
    assert [x["id"] for x in errors["parametric (warmup)"]["loss_examples"]] == ["h0", "h3"]
    assert (cfg.out_dir / "diffs.png").stat().st_size > 1000 and "![Differences with 95% intervals](diffs.png)" in report


def test_per_type_can_differ_per_dataset(tmp_path, hotpot_file):
    """``--per-type 1,2``: the first dataset gets 1 question per sub-type, the second 2."""
    from prag_vllm.evaluation.run import prepare

    one = prepare(EvalConfig(datasets=[str(hotpot_file)], out_dir=tmp_path / "a", per_type=1))
    runs = prepare(EvalConfig(datasets=[str(hotpot_file), f"hotpotqa={hotpot_file}"], out_dir=tmp_path / "b",
                              per_type=[1, 2]))
    types = len(one[0].subtypes)
    assert len(one[0].questions) == types
    assert [len(r.questions) for r in runs] == [types, 2 * types]
    assert runs[0].questions == one[0].questions


def test_rerun_with_other_settings_is_refused(tmp_path):
    _check_settings(tmp_path, {"model": "m", "top_k": 3, "datasets": {"hotpotqa": "/a"}})
    _check_settings(tmp_path, {"model": "m", "top_k": 3, "datasets": {"popqa": "/b"}})  # adding a dataset is fine
    with pytest.raises(InputError, match="top_k"):
        _check_settings(tmp_path, {"model": "m", "top_k": 1, "datasets": {}})
    with pytest.raises(InputError, match="dataset hotpotqa"):
        _check_settings(tmp_path, {"model": "m", "top_k": 3, "datasets": {"hotpotqa": "/c"}})


def test_rerun_may_add_a_recipe_but_not_change_one(tmp_path):
    base = {"model": "m", "top_k": 3, "datasets": {"hotpotqa": "/a"}}
    _check_settings(tmp_path, {**base, "train": {"default": {"rank": 2, "epochs": 3}}})
    _check_settings(tmp_path, {**base, "train": {"paper": {"rank": 2, "epochs": 1}}})  # another recipe: fine
    _check_settings(tmp_path, {**base, "train": {"default": {"rank": 2, "epochs": 3}}})  # a subset: fine
    assert json.loads((tmp_path / "run_config.json").read_text())["train"] == {
        "default": {"rank": 2, "epochs": 3}, "paper": {"rank": 2, "epochs": 1}}
    with pytest.raises(InputError, match="recipe paper's training settings"):
        _check_settings(tmp_path, {**base, "train": {"default": {"rank": 2, "epochs": 3}, "paper": {"rank": 2, "epochs": 2}}})
    with pytest.raises(InputError, match="top_k"):
        _check_settings(tmp_path, {**base, "top_k": 1, "train": {"distill": {"rank": 2}}})


def test_single_recipe_out_dir_is_migrated(tmp_path):
    """An out dir of the one-recipe layout (flat ``train``, ``runs/<dataset>/<init>.jsonl``) resumes
    under the recipe's name; a rerun of other training settings is still refused."""
    default = {"recipe": "default", "rank": 2, "epochs": 3}
    (tmp_path / "run_config.json").write_text(json.dumps({"model": "m", "top_k": 3, "train": default,
                                                          "datasets": {"hotpotqa": "/a"}}))
    runs = tmp_path / "runs" / "hotpotqa"
    runs.mkdir(parents=True)
    for name in ("base", "random"):
        (runs / f"{name}.jsonl").write_text(json.dumps({"id": "h0", "mode": name}) + "\n")
    (tmp_path / "timings.json").write_text(json.dumps({"hotpotqa": {"augment": {"docs": 4, "seconds": 8.0},
                                                                    "train": {"random": {"docs": 4, "seconds": 9.0}}},
                                                       "warmup": {"pairs": 3, "seconds": 1.0}}))
    with pytest.raises(InputError, match="recipe default"):
        _check_settings(tmp_path, {"model": "m", "top_k": 3, "train": {"default": {**default, "epochs": 1}},
                                   "datasets": {}})
    assert (runs / "random.jsonl").is_file()  # refused: nothing moved
    paper = {"recipe": "paper", "rank": 2, "epochs": 1}
    _check_settings(tmp_path, {"model": "m", "top_k": 3, "train": {"default": default, "paper": paper}, "datasets": {}})
    assert sorted(p.name for p in runs.iterdir()) == ["base.jsonl", "default-random.jsonl"]
    assert json.loads((runs / "default-random.jsonl").read_text())["mode"] == "random"
    timings = json.loads((tmp_path / "timings.json").read_text())
    assert timings["hotpotqa"]["train"] == {"default": {"random": {"docs": 4, "seconds": 9.0}}}
    assert timings["warmup"] == {"pairs": 3, "seconds": 1.0}
    assert json.loads((tmp_path / "run_config.json").read_text())["train"] == {"default": default, "paper": paper}


@pytest.mark.parametrize("extra,needle", [
    (["--dataset", "{popqa}"], "has no passages"),
    (["--dataset", "{hot}", "--mode", "bogus"], "unknown mode"),
    (["--dataset", "{hot}", "--init", "zero"], "unknown LoRA init"),
    (["--dataset", "{hot}", "--limit", "2", "--per-type", "1"], "not allowed with"),
    (["--dataset", "{missing}"], "not found"),
    (["--dataset", "{hot}", "--init", "random,warmup"], "no questions left for the warm-up"),
    (["--dataset", "{hot}", "--recipe", "default,bogus"], "recipe"),
    (["--dataset", "{hot}", "--per-type", "1,2"], "2 counts for 1 datasets"),
    (["--dataset", "{hot}", "--per-type", "0"], "must be positive"),
    (["--dataset", "{hot}", "--per-type", "two"], "one per dataset"),
    (["--dataset", "{hot}", "--merge-policy", "median"], "invalid choice"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, hotpot_file, capsys, extra, needle):
    popqa = tmp_path / "popqa.jsonl"
    popqa.write_text(json.dumps({"id": 1, "question": "Q?", "possible_answers": '["a"]'}) + "\n")
    paths = {"popqa": popqa, "hot": hotpot_file, "missing": tmp_path / "nope.json"}
    argv = ["eval", "--out", str(tmp_path / "out"), *[a.format(**paths) for a in extra]]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0]
    assert not (tmp_path / "out").exists()


def test_a_started_engine_is_stopped_before_training_with_work_to_do(tmp_path, test_model_dir):
    """``prag eval`` stops the engine it started for augmentation before training (its
    processes hold GBs the trainer needs); an engine not started, or no training left, stays."""
    from prag_vllm.adapters import AdapterStore
    from prag_vllm.evaluation.run import _release_engine
    from prag_vllm.parameterize import source_digest

    class Engine:
        def __init__(self, started):
            self.started, self.closed = started, 0

        def close(self):
            self.closed += 1
            self.started = False

    store = AdapterStore(tmp_path / "store")
    docs = DOCS[:2]
    for started, expect in ((True, 1), (False, 0)):
        engine = Engine(started)
        _release_engine(engine, docs, AUGS, store)
        assert engine.closed == expect
    from prag_vllm.training.driver import pending

    assert pending(docs, AUGS, store)[0] == docs
    for i, d in enumerate(docs):
        adapter = random_adapter(test_model_dir, seed=i)
        adapter.meta = {"train": {"source": source_digest(d, AUGS.get(d.id))}}
        store.save(d.id, adapter)
        assert pending(docs, AUGS, store)[0] == docs[i + 1:]
    engine = Engine(True)
    _release_engine(engine, docs, AUGS, store)
    assert engine.closed == 0, "nothing left to train: the engine stays for the answers"
