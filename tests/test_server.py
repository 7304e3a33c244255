"""The OpenAI-compatible server, started for real on loopback and driven by the official ``openai`` client."""

from __future__ import annotations

import concurrent.futures as cf
import time

import httpx
import openai
import pytest

pytestmark = pytest.mark.vllm

from server_fixture import API_KEY, EVICT_DOC, MODES, NO_ADAPTER, SWAP_DOC, WORDS  # noqa: E402  (after the marker, as pytest reads it)


@pytest.fixture()
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key=API_KEY, max_retries=0, timeout=180)


def _ask(client, question: str, mode: str, **kw):
    return client.chat.completions.create(model=f"prag-{mode}", messages=[{"role": "user", "content": question}],
                                          temperature=0, max_tokens=kw.pop("max_tokens", 12), **kw)


def test_models_lists_every_mode(client):
    assert sorted(m.id for m in client.models.list()) == sorted(f"prag-{m}" for m in MODES)


@pytest.mark.parametrize("mode", MODES)
def test_chat_each_mode(client, mode):
    r = _ask(client, "When did the Kestrune festival start?", mode)
    info = r.model_extra["prag"]
    assert r.choices[0].message.content and r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    assert info["mode"] == mode
    if mode == "closed-book":
        assert info["retrieved"] == [] and info["adapter"] is None
    else:
        assert info["retrieved"][0] == "doc9"  # Kestrune
    if mode in ("parametric", "combined"):
        assert info["parametric"] == sorted(d for d in info["retrieved"] if d not in NO_ADAPTER)
        assert info["adapter"]["rank"] == 2 * len(info["parametric"])
    else:
        assert info["parametric"] == []
    if mode == "parametric":  # documents without an adapter go in context
        assert info["in_context"] == [d for d in info["retrieved"] if d in NO_ADAPTER]
    elif mode != "closed-book":
        assert info["in_context"] == info["retrieved"]


def test_streaming_matches_non_streaming(client):
    for mode in ("parametric", "standard"):
        ref = _ask(client, "Who holds the Zandrel festival?", mode)
        stream = _ask(client, "Who holds the Zandrel festival?", mode, stream=True,
                      stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == ref.choices[0].message.content
        assert chunks[-1].usage.completion_tokens == ref.usage.completion_tokens
        assert chunks[0].model_extra["prag"]["parametric"] == ref.model_extra["prag"]["parametric"]


def test_completions_streaming_and_not(client):
    ref = client.completions.create(model="prag-parametric", prompt="The Graymoor festival", max_tokens=10,
                                    temperature=0, extra_body={"top_k": 2})
    assert ref.choices[0].text and ref.usage.completion_tokens == 10
    assert ref.model_extra["prag"]["top_k"] == 2 and len(ref.model_extra["prag"]["retrieved"]) <= 2
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="prag-parametric", prompt="The Graymoor festival", max_tokens=10, temperature=0, stream=True,
        extra_body={"top_k": 2}))
    assert streamed == ref.choices[0].text


def test_adapter_is_the_exact_merge(client, server, vllm_engine, tmp_path):
    """The server's parametric answer equals the offline engine with the merge of the same documents."""
    from prag_vllm.corpus import Document
    from prag_vllm.merge import DEFAULT_MERGE_POLICY, merge_adapters
    from prag_vllm.modes import MODES as MODE_OBJS

    q = "Which town has the Uskor festival and the Fennick festival?"
    r = _ask(client, q, "parametric", max_tokens=16)
    info = r.model_extra["prag"]
    assert len(info["parametric"]) >= 1 and info["adapter"]["worker_merge"]  # built in vLLM's worker
    merged = merge_adapters([server["store"].load(d) for d in info["parametric"]], policy=DEFAULT_MERGE_POLICY)
    path = merged.save(tmp_path / "merged", dtype=next(iter(merged.weights.values()))[0].dtype)
    in_ctx = [Document(**server["docs"][d]) for d in info["in_context"]]
    offline = vllm_engine.generate([MODE_OBJS["parametric"].messages(q, in_ctx)], [path], max_tokens=16)[0]
    assert offline.text == r.choices[0].message.content
    base = _ask(client, q, "closed-book", max_tokens=16).choices[0].message.content
    assert base != r.choices[0].message.content  # the adapter changes the answer


def test_concurrent_requests_never_leak_adapters(client):
    """16 parametric requests with distinct document sets (+4 closed-book) at once == each sent alone."""
    pairs = [(i, i + 1) for i in range(0, 20, 2)] + [(i, i + 2) for i in range(0, 12, 2)]
    jobs = [(f"What links {WORDS[a]} and {WORDS[b]}?", "parametric") for a, b in pairs]
    jobs += [(f"What is {WORDS[i]} known for?", "closed-book") for i in (1, 5, 9, 13)]
    alone = [_ask(client, q, m, extra_body={"top_k": 2}) for q, m in jobs]
    sets = {tuple(r.model_extra["prag"]["parametric"]) for r, (_, m) in zip(alone, jobs) if m == "parametric"}
    assert len(sets) == 16
    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: _ask(client, job[0], job[1], extra_body={"top_k": 2}), jobs))
    for a, t, job in zip(alone, together, jobs):
        assert t.model_extra["prag"]["parametric"] == a.model_extra["prag"]["parametric"], job
        assert t.choices[0].message.content == a.choices[0].message.content, job


def _raw(server, body, path="/v1/chat/completions", key=API_KEY, content=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if content is not None:
        return httpx.post(server["base"] + path, content=content, timeout=60,
                          headers=dict(headers, **{"content-type": "application/json"}))
    return httpx.post(server["base"] + path, json=body, headers=headers, timeout=60)


GOOD = {"model": "prag-parametric", "messages": [{"role": "user", "content": "Where is Lumeria?"}], "max_tokens": 4}


@pytest.mark.parametrize("name,kwargs,status", [
    ("malformed json", {"content": b'{"model": "prag-parametric", "messages": ['}, 400),
    ("unknown model", {"body": dict(GOOD, model="gpt-17")}, 404),
    ("unknown mode", {"body": dict(GOOD, mode="telepathic")}, 400),
    ("missing messages", {"body": {"model": "prag-standard"}}, 400),
    ("empty messages", {"body": dict(GOOD, messages=[])}, 400),
    ("top_k zero", {"body": dict(GOOD, top_k=0)}, 400),
    ("top_k too big", {"body": dict(GOOD, top_k=9)}, 400),
    ("top_k string", {"body": dict(GOOD, top_k="3")}, 400),
    ("oversize prompt", {"body": dict(GOOD, mode="standard",
                                      messages=[{"role": "user", "content": "Lumeria " * 3000}])}, 400),
    ("max_tokens too big", {"body": dict(GOOD, max_tokens=10**6)}, 400),
    ("unknown field", {"body": dict(GOOD, temprature=0)}, 400),
    ("ignore_eos string", {"body": dict(GOOD, ignore_eos="yes")}, 400),
    ("min_tokens negative", {"body": dict(GOOD, min_tokens=-1)}, 400),
    ("bad api key", {"body": GOOD, "key": "sk-wrong"}, 401),
    ("no api key", {"body": GOOD, "key": None}, 401),
])
def test_error_contract(server, name, kwargs, status):
    r = _raw(server, kwargs.get("body"), key=kwargs.get("key", API_KEY), content=kwargs.get("content"))
    assert r.status_code == status, (name, r.text)
    err = r.json()["error"]
    assert err["message"] and err["type"]
    assert httpx.get(server["base"] + "/health").status_code == 200


def test_openai_client_errors_then_server_still_answers(client, server):
    with pytest.raises(openai.NotFoundError):
        _ask(client, "Where is Lumeria?", "nonsense")
    with pytest.raises(openai.BadRequestError):
        _ask(client, "Where is Lumeria?", "parametric", extra_body={"top_k": 0})
    bad = openai.OpenAI(base_url=server["base"] + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert _ask(client, "Where is Lumeria?", "parametric").choices[0].message.content


def test_metrics_count_requests_and_cache(client, server):
    q = "Tell me about Ilvane."
    first = _ask(client, q, "parametric").model_extra["prag"]["adapter"]
    second = _ask(client, q, "parametric").model_extra["prag"]["adapter"]
    assert second["cache_hit"] and second["key"] == first["key"]
    text = httpx.get(server["base"] + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line.startswith("prag_") and " " in line}
    assert values["prag_adapter_cache_hits_total"] >= 1 and values["prag_adapter_cache_misses_total"] >= 1
    assert values['prag_requests_total{endpoint="chat",mode="parametric",status="200"}'] >= 2
    assert values["prag_adapter_merge_seconds_count"] >= 1
    assert httpx.get(server["base"] + "/metrics").status_code == 401


def test_preloaded_document_adapters(server):
    """--preload-adapters 1: every usable document adapter is read at start (the bad ones are
    rejected there), the gauge shows them in memory, and /health the preload's progress."""
    usable = len(WORDS) - len(NO_ADAPTER) + 2  # + SWAP_DOC, EVICT_DOC
    line = _preload_line(server)
    assert line is not None and f"preloaded {usable} document adapters" in line, line
    text = httpx.get(server["base"] + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    gauge = next(float(ln.split(" ")[1]) for ln in text.splitlines() if ln.startswith("prag_doc_adapters_in_memory "))
    assert gauge == usable
    state = httpx.get(server["base"] + "/health").json()["preload"]
    # vLLM's worker read them too, as many as its 2 MiB cache holds (one float32 adapter here: 1.5 MB)
    assert state["running"] is False and state["documents"] == usable and state["worker_documents"] == 1


def test_health_says_what_the_engine_runs(server):
    """/health names the dtype vLLM runs (``auto`` resolved) and the LoRA ops serving
    adapters, so benchmarks record what actually ran."""
    assert httpx.get(server["base"] + "/health").json()["engine"] == {"dtype": "float32", "lora_ops": "grouped"}


@pytest.mark.parametrize("mode", ["closed-book", "parametric"])
def test_ignore_eos_and_min_tokens_fix_the_length(client, mode):
    """vLLM's sampling extensions: ignore_eos gives exactly max_tokens, min_tokens a floor."""
    q = "Where is Lumeria?"
    natural = _ask(client, q, mode, max_tokens=40)
    fixed = _ask(client, q, mode, max_tokens=40, extra_body={"ignore_eos": True})
    assert natural.usage.completion_tokens < 40, "the test needs an answer that stops before 40 tokens"
    assert fixed.usage.completion_tokens == 40 and fixed.choices[0].finish_reason == "length"
    floor = _ask(client, q, mode, max_tokens=40, extra_body={"min_tokens": natural.usage.completion_tokens + 5})
    assert floor.usage.completion_tokens >= natural.usage.completion_tokens + 5


def _preload_line(server) -> str | None:
    deadline, line = time.time() + 60, None
    while time.time() < deadline and line is None:
        line = next((ln for ln in server["log"].read_text().splitlines() if "preloaded" in ln), None)
        time.sleep(0.5)
    return line


def test_replaced_adapter_while_serving(client, server, vllm_engine, tmp_path):
    """A document adapter trained again while the server runs: the server validated (preloaded)
    the old file, vLLM's worker reads the new one for its first merge, refuses it (sha256),
    and the server re-reads the document and answers with the new adapter; vLLM survives."""
    from conftest import random_adapter
    from prag_vllm.merge import merge_adapters
    from prag_vllm.modes import MODES as MODE_OBJS

    assert _preload_line(server) is not None  # the server holds the old adapter
    doc_id, title = SWAP_DOC
    store = server["store"]
    store.save(doc_id, random_adapter(server["model_dir"], seed=201, std=0.05))
    q = f"What is cast in {title}?"
    r = _ask(client, q, "parametric", max_tokens=12, extra_body={"top_k": 1})
    info = r.model_extra["prag"]
    assert info["parametric"] == [doc_id] and info["adapter"]["cache_hit"] is False
    assert "failed to load" in server["log"].read_text()
    new = merge_adapters([store.load(doc_id)]).save(tmp_path / "new")
    offline = vllm_engine.generate([MODE_OBJS["parametric"].messages(q, [])], [new], max_tokens=12)[0]
    assert offline.text == r.choices[0].message.content
    assert _ask(client, "Where is Lumeria?", "parametric").choices[0].message.content  # engine alive


def test_adapter_replaced_after_vllm_dropped_it(client, server, vllm_engine, tmp_path):
    """The server still caches a merged adapter that vLLM's own LRU (8 adapters here) has
    dropped, and its document's adapter is then replaced: the server has vLLM load it again
    before the request runs, sees it refused, and merges the new one; vLLM survives."""
    from conftest import random_adapter
    from prag_vllm.merge import merge_adapters
    from prag_vllm.modes import MODES as MODE_OBJS

    doc_id, title = EVICT_DOC
    q = f"What do the {title} kilns fire?"
    first = _ask(client, q, "parametric", max_tokens=12, extra_body={"top_k": 1}).model_extra["prag"]
    assert first["parametric"] == [doc_id]
    for i in range(0, 18, 2):  # nine other merged adapters: vLLM drops the first one
        _ask(client, f"What links {WORDS[i]} and {WORDS[i + 1]}?", "parametric", max_tokens=2,
             extra_body={"top_k": 2})
    store = server["store"]
    store.save(doc_id, random_adapter(server["model_dir"], seed=203, std=0.05))
    log_before = server["log"].read_text().count("failed to load")
    r = _ask(client, q, "parametric", max_tokens=12, extra_body={"top_k": 1})
    info = r.model_extra["prag"]
    assert info["parametric"] == [doc_id] and info["adapter"]["cache_hit"] is False
    assert server["log"].read_text().count("failed to load") == log_before + 1
    new = merge_adapters([store.load(doc_id)]).save(tmp_path / "new")
    offline = vllm_engine.generate([MODE_OBJS["parametric"].messages(q, [])], [new], max_tokens=12)[0]
    assert offline.text == r.choices[0].message.content
    assert _ask(client, "Where is Lumeria?", "parametric").choices[0].message.content  # engine alive
