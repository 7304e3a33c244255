"""Hostile input, auth and unusable adapters against the real server (issue: reliability and security)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import pytest

from server_fixture import API_KEY

pytestmark = pytest.mark.vllm

CHAT, CMPL = "/v1/chat/completions", "/v1/completions"
OK = {"model": "prag-parametric", "messages": [{"role": "user", "content": "Where is Lumeria?"}], "max_tokens": 4}
TRAVERSAL = "../../../../etc/passwd"


def _with(**kw) -> dict:
    return dict(OK, **kw)


def _msg(content) -> dict:
    return _with(messages=[{"role": "user", "content": content}])


# (name, path, body: dict | bytes, expected status)
HOSTILE = [
    ("malformed json", CHAT, b'{"model": "prag-parametric", "messages": [', 400),
    ("invalid utf-8", CHAT, b'{"model": "prag-parametric", "messages": [{"role": "user", "content": "\xff\xfe"}]}', 400),
    ("json array body", CHAT, b"[1, 2, 3]", 400),
    ("json string body", CHAT, b'"hello"', 400),
    ("empty body", CHAT, b"", 400),
    ("missing model", CHAT, {"messages": OK["messages"]}, 400),
    ("model not a string", CHAT, _with(model=42), 400),
    ("unknown model", CHAT, _with(model="gpt-17"), 404),
    ("model path traversal", CHAT, _with(model=TRAVERSAL), 404),
    ("mode path traversal", CHAT, _with(mode=TRAVERSAL), 400),
    ("unknown mode", CHAT, _with(mode="telepathic"), 400),
    ("missing messages", CHAT, {"model": "prag-standard"}, 400),
    ("empty messages", CHAT, _with(messages=[]), 400),
    ("messages not a list", CHAT, _with(messages="hi"), 400),
    ("message without role", CHAT, _with(messages=[{"content": "hi"}]), 400),
    ("tool role", CHAT, _with(messages=[{"role": "tool", "content": "hi"}]), 400),
    ("content not text", CHAT, _msg(12345), 400),
    ("image content part", CHAT, _msg([{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]), 400),
    ("empty user message", CHAT, _msg("   "), 400),
    ("no user message", CHAT, _with(messages=[{"role": "system", "content": "be brief"}]), 400),
    ("1 MB message", CHAT, _msg("Lumeria " * 131072), 400),
    ("3 MB body", CHAT, _msg("x" * (3 << 20)), 413),
    ("huge max_tokens", CHAT, _with(max_tokens=10**9), 400),
    ("zero max_tokens", CHAT, _with(max_tokens=0), 400),
    ("negative max_tokens", CHAT, _with(max_tokens=-5), 400),
    ("max_tokens as string", CHAT, _with(max_tokens="4"), 400),
    ("top_k zero", CHAT, _with(top_k=0), 400),
    ("top_k negative", CHAT, _with(top_k=-3), 400),
    ("top_k huge", CHAT, _with(top_k=10**6), 400),
    ("top_k float", CHAT, _with(top_k=2.5), 400),
    ("top_k path", CHAT, _with(top_k=TRAVERSAL), 400),
    ("negative temperature", CHAT, _with(temperature=-1), 400),
    ("temperature as word", CHAT, _with(temperature="hot"), 400),
    ("n = 2", CHAT, _with(n=2), 400),
    ("five stop strings", CHAT, _with(stop=["a", "b", "c", "d", "e"]), 400),
    ("unknown field", CHAT, _with(temprature=0), 400),
    ("document id field", CHAT, _with(doc_ids=[TRAVERSAL]), 400),
    ("stream not bool", CHAT, _with(stream="yes"), 400),
    ("json response format", CHAT, _with(response_format={"type": "json_object"}), 400),
    ("completion prompt of ints", CMPL, {"model": "prag-standard", "prompt": [1, 2, 3]}, 400),
    ("completion without prompt", CMPL, {"model": "prag-standard"}, 400),
    ("two completion prompts", CMPL, {"model": "prag-standard", "prompt": ["a", "b"]}, 400),
    ("unknown route", "/v1/embeddings", {"model": "prag-standard", "input": "x"}, 404),
]


def test_hostile_requests_get_4xx_and_touch_no_file(server):
    assert len(HOSTILE) >= 30
    audit: Path = server["audit"]
    before = len(audit.read_text().splitlines())
    headers = {"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
    for name, path, body, status in HOSTILE:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = httpx.post(server["base"] + path, content=content, headers=headers, timeout=120)
        assert r.status_code == status, (name, r.status_code, r.text[:300])
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"] and err["type"], name
        assert "Traceback" not in r.text, name
    # still healthy and still answering
    assert httpx.get(server["base"] + "/health").json()["status"] == "ok"
    ok = httpx.post(server["base"] + CHAT, json=_with(user=TRAVERSAL), headers=headers, timeout=120)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]
    events = [line.split("\t", 1) for line in audit.read_text().splitlines()[before:]]
    assert not [p for _, p in events if "passwd" in p or p.startswith("/etc")], events
    code = str(Path(__file__).resolve().parents[1])  # this package's (editable) install: sources, metadata
    allowed = [str(server["store"].root), code, sys.prefix, sys.base_prefix, "/dev/shm/prag-merged-",
               "/tmp/prag-merged-", "/proc/", "/sys/"]
    outside = [(k, p) for k, p in events if not any(p.startswith(a) for a in allowed)]
    assert not outside, outside
    writes = [p for k, p in events if k != "read"]
    assert all("prag-merged-" in p for p in writes), writes  # only the private merged-adapter cache


@pytest.mark.parametrize("method,path", [("GET", "/v1/models"), ("POST", CHAT), ("POST", CMPL), ("GET", "/metrics")])
def test_every_route_but_health_needs_the_key(server, method, path):
    body = OK if path == CHAT else {"model": "prag-standard", "prompt": "Lumeria", "max_tokens": 2}
    for key, status in ((None, 401), ("sk-wrong", 401), ("", 401), (API_KEY + "x", 401), (API_KEY, 200)):
        headers = {} if key is None else {"Authorization": f"Bearer {key}".strip()}
        r = httpx.request(method, server["base"] + path, json=body if method == "POST" else None, headers=headers,
                          timeout=120)
        assert r.status_code == status, (path, key, r.text[:200])
        if status == 401:
            assert r.json()["error"]["code"] == "invalid_api_key"
    basic = httpx.get(server["base"] + "/v1/models", headers={"Authorization": f"Basic {API_KEY}"})
    assert basic.status_code == 401
    assert httpx.get(server["base"] + "/health").status_code == 200  # no key needed


@pytest.mark.parametrize("doc_id,title", [("bad-bytes", "Corruptia"), ("bad-model", "Wrongmodelia")])
def test_unusable_adapter_falls_back_to_context(server, doc_id, title):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    for _ in range(2):  # rejected once, remembered, and reported on every request
        r = httpx.post(server["base"] + CHAT, headers=headers, timeout=120,
                       json=_with(messages=[{"role": "user", "content": f"What does {title} have?"}], top_k=1))
        assert r.status_code == 200, r.text
        info = r.json()["prag"]
        assert info["retrieved"] == [doc_id] and info["parametric"] == [] and info["in_context"] == [doc_id]
        assert info["rejected_adapters"] == [doc_id] and info["adapter"] is None
    assert httpx.get(server["base"] + "/health").status_code == 200
    assert "rejected" in server["log"].read_text()
