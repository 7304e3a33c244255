"""``prag eval`` with a fake engine and the tiny model: several recipes in one run, a work dir
outside the output dir that resumes without redoing anything, recipes that never share
adapters, comparisons with bootstrap intervals in metrics.json, and the ``--recipe`` list."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from prag_vllm.adapters import AdapterStore
from prag_vllm.augment import AugmentConfig
from prag_vllm.cli import main
from prag_vllm.errors import InputError
from prag_vllm.evaluation import run as eval_run
from prag_vllm.evaluation.run import EvalConfig, run_eval
from prag_vllm.generate import Generation
from prag_vllm.parameterize import TrainConfig

HOT = [{"_id": f"h{i}", "question": f"What does the paragraph about Kestrel{i} say?", "answer": f"answer {i}",
        "type": "bridge" if i % 3 else "comparison", "level": "easy", "supporting_facts": [],
        "context": [[f"Kestrel{i}", [f"Kestrel{i} says answer {i}."]]]} for i in range(6)]


class FakeEngine:
    """Augments with canned text; answers by rule: closed-book never knows, standard RAG knows the
    even questions, an adapter of the ``default`` recipe every question, one of ``paper`` the odd ones."""

    tokenizer = None

    def __init__(self):
        self.chats = self.generates = 0
        self.adapters: list[Path] = []

    @property
    def calls(self) -> int:
        return self.chats + self.generates

    def chat(self, conversations, *, max_tokens, temperature=0.0, seed=None):
        self.chats += 1
        outs = []
        for conv in conversations:
            text = conv[-1]["content"]
            passage = text.split("Passage:\n", 1)[-1]
            said = re.search(r"says (answer \d+)", passage)
            outs.append(passage if text.startswith("Rewrite") else
                        json.dumps([{"question": "What does the paragraph say?", "answer": said.group(1) if said else "x"}]))
        return outs

    def generate(self, conversations, adapters=None, *, max_tokens=32, **kw):
        self.generates += 1
        outs = []
        for conv, adapter in zip(conversations, adapters or [None] * len(conversations)):
            text = conv[-1]["content"]
            i = int(re.search(r"paragraph about Kestrel(\d+)", text).group(1))
            if adapter is not None:
                self.adapters.append(Path(adapter))
                knows = "/paper-" not in str(adapter) or i % 2 == 1
            else:
                knows = "Context:" in text and i % 2 == 0
            outs.append(Generation(text=f"answer {i}" if knows else "No idea", token_ids=[1, 2], prompt_tokens=9,
                                   finish_reason="stop"))
        return outs


@pytest.fixture
def hotpot_file(tmp_path):
    path = tmp_path / "hotpot.json"
    path.write_text(json.dumps(HOT))
    return path


@pytest.fixture
def trained(monkeypatch):
    """Every train_adapters call of run_eval: (store root, documents trained)."""
    calls = []
    real = eval_run.train_adapters

    def spy(docs, augs, store, model_path, cfg):
        summary = real(docs, augs, store, model_path, cfg)
        calls.append((store.root, summary["trained"]))
        return summary

    monkeypatch.setattr(eval_run, "train_adapters", spy)
    return calls


@pytest.fixture
def loads(monkeypatch):
    """Every AdapterStore.load: the store root it read from."""
    roots = []
    real = AdapterStore.load

    def spy(self, doc_id):
        roots.append(self.root)
        return real(self, doc_id)

    monkeypatch.setattr(AdapterStore, "load", spy)
    return roots


def _cfg(data, out, work, recipes, **kw):
    trains = [TrainConfig(recipe=r, epochs=1, max_length=128, precision="float32") for r in recipes]
    kw.setdefault("top_k", 1)
    return EvalConfig(datasets=[str(data)], out_dir=out, work_dir=work, limit=4, train=trains,
                      augment=AugmentConfig(n_rewrites=1, n_qa=1, max_retries=0), batch_size=8, max_tokens=8, **kw)


def _files(*roots):
    return {p: p.stat().st_mtime_ns for root in roots for p in Path(root).rglob("*")
            if p.is_file() and p.suffix != ".png" and p.name not in ("metrics.json", "report.md", "predictions.jsonl")}


def test_two_recipes_outside_work_dir_resume_and_comparisons(tmp_path, hotpot_file, tiny_model_dir, trained):
    out, work = tmp_path / "out", tmp_path / "cache" / "eval" / "hot"  # the work dir is not under out
    cfg = _cfg(hotpot_file, out, work, ["default", "paper"])
    engine = FakeEngine()
    metrics = run_eval(cfg, engine, tiny_model_dir)
    assert engine.chats > 0 and engine.generates > 0
    roots = [root for root, _ in trained]
    assert len(roots) == 2 and roots[0] != roots[1] and all(n > 0 for _, n in trained)
    assert [r.name.split("-")[0] for r in roots] == ["default", "paper"] and all(work in r.parents for r in roots)
    assert not (out / "work").exists()
    assert sorted(p.name for p in (out / "runs" / "hotpotqa").iterdir()) == [
        "base.jsonl", "default-random.jsonl", "paper-random.jsonl"]

    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * (3 + 2 * 2)
    assert {r["recipe"] for r in rows if r["mode"] in ("parametric", "combined")} == {"default", "paper"}
    assert all(r["recipe"] is None for r in rows if r["mode"] not in ("parametric", "combined"))
    saved = json.loads((out / "metrics.json").read_text())
    by_label = {e["label"]: e for e in saved["datasets"]["hotpotqa"]["rows"]}
    assert by_label["parametric (paper)"]["recipe"] == "paper" and by_label["parametric (paper)"]["n"]["total"] == 4
    assert by_label["parametric (default)"]["f1"]["total"] == 1.0 and by_label["standard"]["f1"]["total"] == 0.5
    comps = {(c["a"], c["b"]): c for c in saved["comparisons"]}
    assert set(comps) == {
        *((f"parametric ({r})", "closed-book") for r in ("default", "paper")),
        *((f"combined ({r})", "standard") for r in ("default", "paper")),
        *((f"parametric ({r})", "standard") for r in ("default", "paper")),
        ("parametric (default)", "parametric (paper)"), ("combined (default)", "combined (paper)")}
    for c in saved["comparisons"]:
        assert c["dataset"] == "hotpotqa" and c["metric"] == "f1" and c["n"] == 4
        assert c["ci_low"] <= c["diff"] <= c["ci_high"] and c["distinguishable"] == (c["ci_low"] > 0 or c["ci_high"] < 0)
    c = comps["parametric (default)", "closed-book"]  # right on every question vs never: a sure +1
    assert (c["diff"], c["ci_low"], c["ci_high"], c["distinguishable"]) == (1.0, 1.0, 1.0, True)
    c = comps["parametric (default)", "parametric (paper)"]  # +1 on the even questions, 0 on the odd ones
    assert c["diff"] == 0.5 and c["ci_low"] == 0.0 and c["ci_high"] == 1.0 and not c["distinguishable"]
    assert metrics["comparisons"] == saved["comparisons"]
    errors = {e["a"]: e for e in saved["datasets"]["hotpotqa"]["errors"]}
    paper = errors["parametric (paper)"]
    assert (paper["wins"], paper["losses"], paper["ties"]) == (2, 2, 0)
    assert [x["id"] for x in paper["win_examples"]] == ["h1", "h3"]
    assert paper["loss_examples"][0] == {"id": "h0", "type": "comparison", "question": "What does the paragraph about Kestrel0 say?",
                                         "answers": ["answer 0"], "a_answer": "No idea", "b_answer": "answer 0",
                                         "a_f1": 0.0, "b_f1": 1.0}
    report = (out / "report.md").read_text()
    for needle in ("## Differences", "## Error analysis", "### hotpotqa: parametric (paper) vs standard",
                   "| parametric (default) − parametric (paper) | +0.500 | [+0.000, +1.000] | 4 | no |",
                   "## Clean answers", "speed-up vs standard", "recipes default (loss content"):
        assert needle in report, needle
    assert (out / "diffs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the same command again: nothing redone -- no engine call, no training, no log or adapter rewritten
    before = _files(out, work)
    trained.clear()
    again = FakeEngine()
    run_eval(cfg, again, tiny_model_dir)
    assert again.calls == 0 and all(n == 0 for _, n in trained)
    assert _files(out, work) == before
    assert [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()] == rows

    # the output dir lost: the work dir outside it still holds augmentations and adapters
    fresh = FakeEngine()
    trained.clear()
    run_eval(_cfg(hotpot_file, tmp_path / "out2", work, ["default", "paper"]), fresh, tiny_model_dir)
    assert fresh.chats == 0 and fresh.generates > 0 and all(n == 0 for _, n in trained)
    assert _files(work) == {p: t for p, t in before.items() if work in p.parents}


def test_another_recipe_never_reuses_adapters(tmp_path, hotpot_file, tiny_model_dir, trained, loads):
    work = tmp_path / "work"
    modes = ["closed-book", "standard", "parametric"]
    run_eval(_cfg(hotpot_file, tmp_path / "a", work, ["default"], modes=modes), FakeEngine(), tiny_model_dir)
    ((default_root, n_docs),) = trained
    assert n_docs > 0 and loads and set(loads) == {default_root}

    trained.clear()
    loads.clear()
    engine = FakeEngine()
    run_eval(_cfg(hotpot_file, tmp_path / "b", work, ["paper"], modes=modes), engine, tiny_model_dir)
    ((paper_root, paper_docs),) = trained
    assert paper_root != default_root and paper_root.parent == default_root.parent
    assert paper_docs == n_docs, "the paper recipe trains every document afresh"
    assert engine.chats == 0, "augmentations are shared between recipes"
    assert loads and set(loads) == {paper_root}, "no adapter of the default recipe is read"
    assert engine.adapters and all(paper_root in p.parents for p in engine.adapters)
    assert json.loads((paper_root / "train_config.json").read_text())["recipe"] == "paper"

    # adding the paper recipe to run a: base and default answers kept, paper's answered, nothing trained
    trained.clear()
    loads.clear()
    more = FakeEngine()
    metrics = run_eval(_cfg(hotpot_file, tmp_path / "a", work, ["default", "paper"], modes=modes), more, tiny_model_dir)
    assert more.chats == 0 and more.generates == 1 and all(n == 0 for _, n in trained)
    assert all(paper_root in p.parents for p in more.adapters)
    assert [e["label"] for e in metrics["datasets"]["hotpotqa"]["rows"]] == [
        "closed-book", "standard", "parametric (default)", "parametric (paper)"]


def test_cli_recipe_list(tmp_path, hotpot_file, tiny_model_dir, monkeypatch):
    seen = []
    monkeypatch.setattr(eval_run, "run_eval", lambda cfg, engine: seen.append(cfg) or {})
    base = ["eval", "--dataset", str(hotpot_file), "--limit", "2", "--offline-only", "--model", str(tiny_model_dir)]
    assert main([*base, "--out", str(tmp_path / "o1"), "--recipe", "default,paper", "--epochs", "2"]) == 0
    assert main([*base, "--out", str(tmp_path / "o2"), "--recipe", "paper"]) == 0
    assert main([*base, "--out", str(tmp_path / "o3")]) == 0
    assert [(t.recipe, t.epochs) for t in seen[0].trains] == [("default", 2), ("paper", 2)]
    assert [(t.recipe, t.epochs) for t in seen[1].trains] == [("paper", 1)]
    assert seen[2].recipes == ["default"] and seen[2].work == tmp_path / "o3" / "work"


def test_augment_model_trains_on_another_models_augmentations(tmp_path, hotpot_file, tiny_model_dir, trained):
    """``augment_model``: the augmentations another model wrote are read (never written); when they
    miss a retrieved document the run stops with an error before augmenting or training."""
    work = tmp_path / "work"
    modes = ["closed-book", "parametric"]
    run_eval(_cfg(hotpot_file, tmp_path / "a", work, ["default"], modes=modes), FakeEngine(), tiny_model_dir)
    (mine,) = (work / "hotpotqa" / "augmented").glob(f"{Path(tiny_model_dir).name}-*.jsonl")
    shutil.copy(mine, mine.with_name(mine.name.replace(Path(tiny_model_dir).name, "bigger-model")))

    with pytest.raises(InputError, match="no augmentation by nobody"):
        run_eval(_cfg(hotpot_file, tmp_path / "b", work, ["default"], modes=modes, augment_model="nobody"),
                 FakeEngine(), tiny_model_dir)
    assert not list((work / "hotpotqa" / "augmented").glob("nobody-*")), "nothing written under the other name"

    trained.clear()
    engine = FakeEngine()
    run_eval(_cfg(hotpot_file, tmp_path / "c", work, ["default"], modes=modes, augment_model="bigger-model"),
             engine, tiny_model_dir)
    assert engine.chats == 0, "the other model's augmentations are used as they are"
    assert all(n == 0 for _, n in trained), "same training text: the adapters are the same"
    assert json.loads((tmp_path / "c" / "run_config.json").read_text())["augment_model"] == "bigger-model"


def test_merge_policy_mean_reaches_the_merged_adapters(tmp_path, hotpot_file, tiny_model_dir, trained):
    """``merge_policy="mean"`` (the default): every merge of k > 1 adapters the engine gets is their
    mean, and the run records the policy (a ``sum`` run does not, so runs from before resume)."""
    from prag_vllm.adapters import LoraAdapter

    work, modes = tmp_path / "work", ["parametric"]
    kw = dict(modes=modes, top_k=2)
    engine = FakeEngine()
    run_eval(_cfg(hotpot_file, tmp_path / "a", work, ["default"], merge_policy="sum", **kw), engine, tiny_model_dir)
    assert "merge_policy" not in json.loads((tmp_path / "a" / "run_config.json").read_text())
    assert all("policy" not in LoraAdapter.load(p).meta and LoraAdapter.load(p).scaling == 16.0
               for p in set(engine.adapters))
    engine = FakeEngine()
    run_eval(_cfg(hotpot_file, tmp_path / "b", work, ["default"], **kw), engine, tiny_model_dir)
    assert json.loads((tmp_path / "b" / "run_config.json").read_text())["merge_policy"] == "mean"
    merged = [LoraAdapter.load(p) for p in set(engine.adapters)]
    assert merged and all(m.r == 4 and m.meta["policy"] == "mean" for m in merged)
    assert all(m.scaling == pytest.approx(16.0 / 2) for m in merged)
    with pytest.raises(InputError, match="unknown merge policy"):
        run_eval(_cfg(hotpot_file, tmp_path / "c", work, ["default"], merge_policy="max", **kw), FakeEngine(),
                 tiny_model_dir)
    assert not (tmp_path / "c").exists()
