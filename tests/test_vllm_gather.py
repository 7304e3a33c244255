"""A real engine's decode steps with more distinct adapters than punica.MAX_RUNS: the
compiled gather kernels in vLLM's worker (float32 test model, an engine of its own with
six LoRA slots; the session engine has four, too few for a ``gather`` step)."""

import pytest
import torch

from conftest import random_adapter
from prag_vllm.vllm_plugin import gather, punica

pytestmark = pytest.mark.vllm

Q = [{"role": "user", "content": "Who designed the Tarnholm Bridge?"}]
N_ADAPTERS, MAX_TOKENS = 6, 12


@pytest.fixture(scope="module")
def engine(test_model_dir):
    from prag_vllm.generate import EngineConfig, VLLMEngine

    with VLLMEngine(EngineConfig(model=str(test_model_dir), dtype="float32", max_model_len=512,
                                 max_loras=N_ADAPTERS, max_num_seqs=16)) as eng:
        yield eng


def _state(engine) -> dict:
    return engine.llm.collective_rpc("prag_gather_state")[0]


def test_engine_warms_the_kernels_up_at_start(engine):
    # the warm-up step (one decode token for each of WARM_UP_ADAPTERS adapters) is planned by slot:
    # the gather kernels, or in the batch-invariant mode (the default) the rows kernel
    assert punica.make_plan(torch.arange(gather.WARM_UP_ADAPTERS), invariant=False).kind == "gather"
    assert punica.make_plan(torch.arange(gather.WARM_UP_ADAPTERS), invariant=True).kind == "rows"
    st = _state(engine)
    assert st["compiled"] and not st["failed"], st
    assert not engine.llm.llm_engine.list_loras(), "the warm-up adapters must be unloaded"


def test_many_adapters_in_one_batch_equal_each_alone(engine, test_model_dir, tmp_path):
    paths = [random_adapter(test_model_dir, seed=40 + i, std=0.05).save(tmp_path / f"a{i}")
             for i in range(N_ADAPTERS)]
    alone = [engine.generate([Q], [p], max_tokens=MAX_TOKENS)[0].token_ids for p in paths]
    base = engine.generate([Q], max_tokens=MAX_TOKENS)[0].token_ids
    assert len({tuple(t) for t in alone + [base]}) > 2, "the adapters must change the output"
    batch = engine.generate([Q] * (N_ADAPTERS + 2), [*paths[:3], None, *paths[3:], None], max_tokens=MAX_TOKENS,
                            guard=False)
    got = [g.token_ids for g in batch]
    assert got[:3] + got[4:7] == alone  # 6 distinct adapters per decode step: the gather kernels
    assert got[3] == base and got[7] == base  # no adapter: untouched
    st = _state(engine)
    assert st["compiled"] and not st["failed"] and st["mirrors"] > 0, st


def test_merged_adapters_written_by_the_slot_pools_feed_the_gather_kernels(engine, test_model_dir, tmp_path):
    """Merge manifests activate through the slot pools (vllm_plugin/pools.py), behind the
    layers' own writes: the kernels' mirror of B and the slot ranks must follow. A first
    batch of six merged adapters builds the mirror; six new ones then replace them slot by
    slot (each alone); a batch of those must give each one's tokens alone."""
    from prag_vllm.adapters import LoraAdapter
    from prag_vllm.merge import write_merge_manifest

    def manifests(first: int) -> list:
        out = []
        for i in range(N_ADAPTERS):
            docs = [LoraAdapter.load(random_adapter(test_model_dir, seed=first + 3 * i + j, std=0.05, rank=2)
                                     .save(tmp_path / f"d{first + 3 * i + j}")) for j in range(3)]
            write_merge_manifest(docs, tmp_path / f"m{first + i}", [f"d{j}" for j in range(3)])
            out.append(tmp_path / f"m{first + i}")
        return out

    before = engine.llm.collective_rpc("prag_pool_state")[0]["activations"]
    engine.generate([Q] * N_ADAPTERS, manifests(100), max_tokens=MAX_TOKENS, guard=False)
    mirrors = _state(engine)["mirrors"]
    fresh = manifests(200)
    alone = [engine.generate([Q], [p], max_tokens=MAX_TOKENS)[0].token_ids for p in fresh]
    assert len({tuple(t) for t in alone}) > 1, "the adapters must change the output"
    got = [g.token_ids for g in engine.generate([Q] * N_ADAPTERS, fresh, max_tokens=MAX_TOKENS, guard=False)]
    assert got == alone
    assert engine.llm.collective_rpc("prag_pool_state")[0]["activations"] >= before + 2 * N_ADAPTERS
    assert _state(engine)["mirrors"] >= mirrors > 0
