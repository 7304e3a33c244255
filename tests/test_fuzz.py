"""Schema-driven fuzzing of the HTTP API against the real server (issue: 500s on hostile input).

Schemathesis reads the server's own OpenAPI schema (the request models, ``prag`` extras
included) and generates bodies for both completion routes, schema-valid and not; hypothesis
then mutates some of them towards corners a JSON schema cannot express: a model name the
server serves, lone UTF-16 surrogates (raw JSON ``"\\ud800"``), empty stop strings, integers
past 64 bits, chat-template tokens. Property, for every request:

* no response is a 5xx (nor a stream that ends in a ``server_error`` event);
* every 4xx carries an OpenAI error body ``{"error": {"message": ..., "type": ...}}``;
* ``/health`` stays ok (checked every 25 requests and at the end).

Every failure is collected rather than raised at once, so one run lists them all: each
distinct one (route, status, the exception line the server logged) with its shortest input.

Bounded: at most ``PRAG_FUZZ_EXAMPLES`` requests (default 400) and ``PRAG_FUZZ_SECONDS`` of
sending (default 60); ``PRAG_FUZZ_SEED`` (default 0) picks the examples, so ``make test`` is
reproducible. For a long run: ``PRAG_FUZZ_EXAMPLES=5000 PRAG_FUZZ_SECONDS=1800 PRAG_FUZZ_SEED=7``.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from server_fixture import API_KEY, MODES

pytestmark = pytest.mark.vllm

hypothesis = pytest.importorskip("hypothesis")
schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis.core import NOT_SET  # noqa: E402
from schemathesis.generation.modes import GenerationMode  # noqa: E402

EXAMPLES = int(os.environ.get("PRAG_FUZZ_EXAMPLES", "400"))
SECONDS = float(os.environ.get("PRAG_FUZZ_SECONDS", "60"))
SEED = int(os.environ.get("PRAG_FUZZ_SEED", "0"))
ROUTES = ["/v1/chat/completions", "/v1/completions"]
HEADERS = {"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
MAX_GENERATED = 6
"""Tokens a schema-valid request may generate (the test model on a CPU: keep requests short)."""

NAN, INF = float("nan"), float("inf")
HOSTILE_TEXT = ["\ud800", "\udfff", "a\ud83d", "\ud83d\ude00", "", " ", "\x00", "\u202e\u2066", "\ufeff", "\uffff",
                "\U0010ffff", "<|im_start|>system", "<|endoftext|>", "</s>", "{{ raise_exception('x') }}", "%s%n",
                "../../etc/passwd", "\r\n\r\n", "x" * 5000]
HOSTILE_VALUES: dict[str, list[Any]] = {
    "stop": [[""], "", ["", "x"], [" "], ["\ud800"], "\udfff", ["a", "b", "c", "d"], ["\x00"], [None]],
    "seed": [-1, 0, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30, 1.5],
    "temperature": [0, 1e-300, 2.0, 2.0000001, -0.0, NAN, INF],  # json.dumps writes NaN, which json.loads reads
    "top_p": [1e-300, 1.0, 0.0, 1.0000001, NAN],
    "presence_penalty": [2.0, -2.0, 1e308, NAN, -INF],
    "frequency_penalty": [-2.0, 2.0, -1e-320],
    "min_tokens": [0, 1, 10**6, 2**63, -1],
    "max_tokens": [1, 1024, 1025, 2**63, 2**64, -1, 0, True],
    "top_k": [1, 8, 9, 0, 2**63, None, True],
    "mode": [None, *MODES, "", "\ud800", "../x"],
    "user": ["\ud800", "", "x" * 10000],
    "ignore_eos": [True, False, 1],
    "n": [1, 2, 0, True],
    "stream": [True, False],
    "stream_options": [{"include_usage": True}, {}, None, {"include_usage": "\ud800"}],
    "response_format": [{"type": "text"}, {}, {"type": "\ud800"}, {"type": None}, {"type": ["text"]}],
    "echo": [True, False],
}


def _valid_models(model_dir: Path) -> list[str]:
    return [f"prag-{m}" for m in MODES] + [model_dir.name]


def _string_slots(value: Any, path: tuple = ()) -> list[tuple]:
    """Paths (tuples of keys/indices) to every string value in a JSON value; a key path ends in ``("key", k)``."""
    out: list[tuple] = []
    if isinstance(value, str):
        out.append(path)
    elif isinstance(value, dict):
        for k, v in value.items():
            out.append(path + (("key", k),))
            out += _string_slots(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _string_slots(v, path + (i,))
    return out


def _replace(value: Any, path: tuple, new: str) -> None:
    """Replace the string (or the dict key) at ``path`` inside ``value``, in place."""
    *head, last = path
    for p in head:
        value = value[p]
    if isinstance(last, tuple):  # a key: keep the order, rename it
        items = list(value.items())
        value.clear()
        value.update({(new if k == last[1] else k): v for k, v in items})
    else:
        value[last] = new


QUESTIONS = st.one_of(st.sampled_from(["Where is Lumeria?", "When did the Kestrune festival start?", "Brask"]),
                      st.text(min_size=1, max_size=40).filter(str.strip),
                      st.lists(st.sampled_from(HOSTILE_TEXT + ["Velmora", "festival"]), min_size=1, max_size=4)
                      .map(" Lumeria ".join))


def _steer(draw, body: dict, route: str, models: list[str]) -> None:
    """Repair what the server checks beyond the schema: a served model, mode and top_k in range, a question."""
    body["model"] = draw(st.sampled_from(models))
    if "mode" in body:
        body["mode"] = draw(st.sampled_from([None, *MODES]))
    if "top_k" in body:
        body["top_k"] = draw(st.one_of(st.none(), st.integers(1, 8)))
    if route.endswith("/chat/completions"):
        messages = body.get("messages")
        if isinstance(messages, list) and all(isinstance(m, dict) for m in messages):
            messages.append({"role": "user", "content": draw(QUESTIONS)})
    else:
        body["prompt"] = draw(QUESTIONS)


@st.composite
def requests_(draw, cases: st.SearchStrategy, models: list[str]) -> tuple[str, bytes]:
    """One request: a schemathesis case for a route, then (maybe) hypothesis mutations of its body."""
    case = draw(cases)
    body = case.body
    if isinstance(body, (bytes, bytearray)):
        return case.path, bytes(body)
    if body is NOT_SET:
        return case.path, b""
    if isinstance(body, dict):
        body = json.loads(json.dumps(body))  # a private copy
        if draw(st.integers(0, 9)) < 7:  # mostly a request the server serves, so it reaches retrieval and vLLM
            _steer(draw, body, case.path, models)
        for name in ("max_tokens", "max_completion_tokens"):  # short generations only
            if isinstance(body.get(name), int) and MAX_GENERATED < body[name] <= 1024:
                body[name] = draw(st.integers(1, MAX_GENERATED))
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            body["max_tokens"] = draw(st.integers(1, MAX_GENERATED))
        if isinstance(body.get("min_tokens"), int) and body.get("ignore_eos") and body["min_tokens"] > 0:
            body["min_tokens"] = min(body["min_tokens"], MAX_GENERATED)
        for _ in range(draw(st.integers(0, 2))):  # a hostile value for a known field
            name = draw(st.sampled_from(sorted(HOSTILE_VALUES)))
            body[name] = draw(st.sampled_from(HOSTILE_VALUES[name]))
        slots = _string_slots(body)
        for _ in range(draw(st.integers(0, 2)) if slots else 0):  # a hostile string anywhere (keys too)
            slot = draw(st.sampled_from(slots))
            _replace(body, slot, draw(st.sampled_from(HOSTILE_TEXT)))
            slots = _string_slots(body)
    # the wire format of the issue: ensure_ascii writes a lone surrogate as the JSON escape "\ud800"
    return case.path, json.dumps(body).encode()


def _problem(r: httpx.Response) -> str | None:
    """What is wrong with one response, or None."""
    if r.status_code >= 500:
        return f"{r.status_code}"
    if 400 <= r.status_code < 500:
        try:
            err = r.json()["error"]
            assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
        except Exception:
            return f"{r.status_code} without an OpenAI error body"
        return None
    if r.status_code != 200:
        return f"unexpected {r.status_code}"
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        if '"server_error"' in r.text or not r.text.rstrip().endswith("data: [DONE]"):
            return "200 stream with an error event"
        return None
    try:
        assert r.json()["choices"]
    except Exception:
        return "200 without choices"
    return None


def _logged_error(log: Path, start: int) -> tuple[str, int]:
    """The last exception line the server logged since byte ``start`` (its type and message)."""
    text = log.read_bytes()[start:].decode("utf-8", "replace")
    lines = [ln for ln in text.splitlines() if re.match(r"^[\w.]+(Error|Exception|Exit)\b.*", ln)]
    return (lines[-1][:160] if lines else "(nothing logged)"), start + len(text.encode("utf-8", "replace"))


def test_fuzz_the_http_api(server, capsys):
    """Schemathesis + hypothesis against the real server: no 5xx, 4xx with error bodies, /health ok."""
    base = server["base"]
    spec = httpx.get(base + "/openapi.json", headers=HEADERS, timeout=30)
    assert spec.status_code == 200, spec.text[:300]
    schema = schemathesis.openapi.from_dict(spec.json())
    cases = st.one_of(*[schema[route]["POST"].as_strategy(generation_mode=mode)
                        for route in ROUTES for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)])

    def new_client() -> httpx.Client:
        return httpx.Client(base_url=base, headers=HEADERS, timeout=180)

    clients = [new_client()]
    statuses: Counter[tuple[str, int]] = Counter()
    failures: dict[tuple[str, str, str], bytes] = {}
    log: Path = server["log"]
    state = {"sent": 0, "log_at": log.stat().st_size, "stop_at": time.monotonic() + SECONDS}
    t0 = time.monotonic()

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), print_blob=False)
    @hypothesis.seed(SEED)
    @given(requests_(cases, _valid_models(server["model_dir"])))
    def run(request: tuple[str, bytes]) -> None:
        if time.monotonic() > state["stop_at"]:
            return
        route, content = request
        state["sent"] += 1
        try:
            r = clients[0].post(route, content=content)
            statuses[(route, r.status_code)] += 1
            problem = _problem(r)
        except httpx.HTTPError as exc:
            statuses[(route, 0)] += 1
            problem = f"no response ({type(exc).__name__})"
        if problem is not None:
            # uvicorn closes the connection after an unhandled error: the next request gets a new one
            clients[0].close()
            clients[0] = new_client()
            logged, state["log_at"] = _logged_error(log, state["log_at"])
            key = (route, problem, logged)
            if key not in failures or len(content) < len(failures[key]):
                failures[key] = content
        else:
            state["log_at"] = log.stat().st_size
        if state["sent"] % 25 == 0:
            assert clients[0].get("/health").json()["status"] == "ok", "the server is no longer healthy"

    try:
        run()
    finally:
        health = clients[0].get("/health")
        clients[0].close()
        with capsys.disabled():
            print(f"\nfuzz: {state['sent']} requests in {time.monotonic() - t0:.1f} s (seed {SEED}, at most "
                  f"{EXAMPLES} requests / {SECONDS:.0f} s); status codes:")
            for (route, code), n in sorted(statuses.items()):
                print(f"  {route} {code or 'no response'}: {n}")
            for (route, problem, logged), content in sorted(failures.items()):
                print(f"  FAILURE {route} -> {problem}: {logged}\n    input: {content[:300]!r}")
    assert health.status_code == 200 and health.json()["status"] == "ok", health.text
    assert state["sent"] > 0
    assert not failures, f"{len(failures)} distinct failures (listed above): " + "; ".join(
        f"{route} {problem} {logged}" for route, problem, logged in failures)
