"""Inputs that were 500s, now 400s with an OpenAI error body (issue: 500s on hostile input).

The first two are the issue's cases; the others were found by the first run of the fuzz test
(tests/test_fuzz.py). Each is sent as raw JSON, as a client would, to the real server; the
last two tests check the app's mapping of vLLM's validation errors in-process, on a stub
service, including that any other exception stays a 500.
"""

from __future__ import annotations

import json

import httpx
import pytest

from server_fixture import API_KEY

CHAT, CMPL = "/v1/chat/completions", "/v1/completions"
HEADERS = {"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
CHAT_OK = '"model": "prag-standard", "max_tokens": 2, "messages": [{"role": "user", "content": "Where is Lumeria?"}]'
CMPL_OK = '"model": "prag-standard", "max_tokens": 2, "prompt": "Lumeria is"'


def _post(server, path: str, raw: str) -> httpx.Response:
    """POST ``raw`` (a JSON text, escapes as written) and check the answer is a 400 with an error body."""
    r = httpx.post(server["base"] + path, content=raw.encode(), headers=HEADERS, timeout=120)
    assert r.status_code == 400, (raw, r.status_code, r.text[:300])
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and err["type"] == "invalid_request_error", err
    return r


@pytest.mark.vllm
@pytest.mark.parametrize("path,ok", [(CHAT, CHAT_OK), (CMPL, CMPL_OK)])
@pytest.mark.parametrize("stream", [False, True])
def test_empty_stop_string_is_a_400(server, path, ok, stream):
    """Was: vLLM's ``VLLMValidationError: stop cannot contain an empty string.`` as a 500 (a
    streamed request: a 200 whose only event was a server error)."""
    for stop in ('[""]', '""', '["x", ""]'):
        err = _post(server, path, "{" + ok + f', "stop": {stop}, "stream": {json.dumps(stream)}' + "}").json()["error"]
        assert "stop" in err["param"] and "empty" in err["message"]


@pytest.mark.vllm
def test_lone_surrogate_in_a_message_is_a_400(server):
    """Was: ``TypeError: TextEncodeInput must be Union[...]`` from the tokenizer, a 500."""
    for content in (r'"\ud800"', r'"Where is \udfff Lumeria?"', r'[{"type": "text", "text": "\ud83d"}]'):
        raw = '{"model": "prag-parametric", "max_tokens": 2, "messages": [{"role": "user", "content": ' + content
        raw += "}]}"
        err = _post(server, CHAT, raw).json()["error"]
        assert err["param"].startswith("messages.0.content") and "Unicode" in err["message"]
    r = _post(server, CMPL, r'{"model": "prag-standard", "max_tokens": 2, "prompt": "\ud800"}')
    assert r.json()["error"]["param"] == "prompt"


@pytest.mark.vllm
@pytest.mark.parametrize("field", ["model", "user", "mode", "stop", "name", "key"])
def test_lone_surrogate_anywhere_is_a_400(server, field):
    """Found by the fuzz test: a model name with a lone surrogate got a 404 whose body could not be
    encoded (UnicodeEncodeError, a 500); every other string field (and a field name) is checked too."""
    raw = {
        "model": r'{"model": "\ud800", "max_tokens": 2, "prompt": "x"}',
        "user": "{" + CMPL_OK + r', "user": "\udfff"}',
        "mode": "{" + CMPL_OK + r', "mode": "a\ud800"}',
        "stop": "{" + CMPL_OK + r', "stop": ["\ud800"]}',
        "name": r'{"model": "prag-standard", "messages": [{"role": "user", "name": "\ud800", "content": "x"}]}',
        "key": "{" + CMPL_OK + r', "\ud800": 1}',
    }[field]
    r = _post(server, CMPL if field != "name" else CHAT, raw)
    assert "Unicode" in r.json()["error"]["message"]
    r.content.decode("utf-8")  # the body itself is valid UTF-8


@pytest.mark.vllm
@pytest.mark.parametrize("seed", [2**64, 2**63, -(2**63) - 1, 10**30])
def test_seed_beyond_64_bits_is_a_400(server, seed):
    """Found by the fuzz test: vLLM's msgpack transport raised OverflowError (EngineGenerateError, a 500)."""
    err = _post(server, CMPL, "{" + CMPL_OK + f', "seed": {seed}' + "}").json()["error"]
    assert err["param"] == "seed"


@pytest.mark.vllm
def test_server_still_answers_after_them(server):
    r = httpx.post(server["base"] + CMPL, content=("{" + CMPL_OK + ', "seed": 9223372036854775807}').encode(),
                   headers=HEADERS, timeout=120)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None
    assert httpx.get(server["base"] + "/health").json()["status"] == "ok"


# -- the app's mapping of vLLM's exceptions, on a stub service (no engine) -----------------------


class _StubEngine:
    healthy, dtype, lora_ops = True, "float32", "off"

    def __init__(self, error: Exception):
        self.error = error

    def sampling_params(self, **kw):
        raise self.error


class _StubService:
    def __init__(self, error: Exception):
        from serving.metrics import ServerMetrics

        self.engine, self.metrics = _StubEngine(error), ServerMetrics()

    def resolve_mode(self, model: str, mode: str | None):
        from prag_vllm.modes import MODES

        return MODES["closed-book"]

    async def plan(self, question: str, mode, k: int):
        from serving.service import Plan

        return Plan(mode=mode, k=k)

    def release(self, plan) -> None:
        pass

    def completion_prompt_ids(self, prompt: str, plan) -> list[int]:
        return [1, 2, 3]


def _answer(error: Exception, healthy: bool = True) -> httpx.Response:
    from fastapi.testclient import TestClient

    from serving.app import create_app

    service = _StubService(error)
    service.engine.healthy = healthy
    with TestClient(create_app(service), raise_server_exceptions=False) as client:
        r = client.post(CMPL, json={"model": "prag-closed-book", "prompt": "x", "max_tokens": 2})
        r.health = client.get("/health").status_code
        return r


def test_a_vllm_validation_error_is_a_400():
    from vllm.exceptions import VLLMValidationError

    r = _answer(VLLMValidationError("temperature must be non-negative", parameter="temperature", value=-1))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "temperature" and r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("error", [ValueError("a bug"), TypeError("another"), OverflowError("and another")])
def test_any_other_error_stays_a_500(error):
    r = _answer(error)
    assert r.status_code == 500 and r.json()["error"] == {"message": "internal server error", "type": "server_error",
                                                          "param": None, "code": None}


def test_an_error_from_a_dead_engine_is_a_503():
    """Behind a balancer (deploy/haproxy.cfg: retry-on 503) a request that met a dead engine is
    replayed on another replica; /health says 503 as well, so the replica is taken out."""
    from vllm.v1.engine.exceptions import EngineDeadError

    r = _answer(EngineDeadError(), healthy=False)
    assert r.status_code == 503 and r.json()["error"]["type"] == "server_error", r.text
    assert r.health == 503
