"""Soak: 64 concurrent clients for PRAG_SOAK_SECONDS (default 120) against the real server.

Mixed modes and distinct document sets (more sets than the merged-adapter cache holds, so
entries are evicted and rebuilt while other requests use theirs). Every answer is compared
with the same request sent alone beforehand (greedy; float32 unless ``PRAG_TEST_SERVER_DTYPE``
says otherwise; mismatches also counted per mode). Figures go to ``$PRAG_SOAK_REPORT``
(default: the test's tmp dir) and the test output.

Run it alone:  PRAG_SOAK_SECONDS=300 .venv/bin/python -m pytest -s tests/test_soak.py
In the production dtype (``PRAG_TEST_SERVER_DTYPE=auto``, bf16 on a CPU with native bf16):
``bench/batch_invariance.py soak``, a benchmark, not CI.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from pathlib import Path

import httpx
import pytest

from server_fixture import API_KEY, SERVER_DTYPE, WORDS

pytestmark = pytest.mark.vllm

CLIENTS = 64
MODES = ["parametric", "combined", "parametric", "standard", "closed-book", "parametric", "da-rag"]
JOBS = 100


def _rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and all its descendants (vLLM's engine process), MiB."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, StopIteration):
            continue
    return total / 1024


def _metric(text: str, name: str) -> float:
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_soak_64_clients(server, tmp_path):
    seconds = float(os.environ.get("PRAG_SOAK_SECONDS", "120"))
    headers = {"Authorization": f"Bearer {API_KEY}"}
    rng = random.Random(0)
    pairs = [(a, b) for a in range(len(WORDS)) for b in range(a + 1, len(WORDS))]
    rng.shuffle(pairs)
    jobs = [{"model": f"prag-{MODES[i % len(MODES)]}", "top_k": 2, "max_tokens": 8, "temperature": 0,
             "messages": [{"role": "user", "content": f"How are {WORDS[a]} and {WORDS[b]} related?"}]}
            for i, (a, b) in enumerate(pairs[:JOBS])]
    url = server["base"] + "/v1/chat/completions"
    with httpx.Client(headers=headers, timeout=300) as c:
        reference = []
        for job in jobs:
            r = c.post(url, json=job)
            assert r.status_code == 200, r.text
            reference.append((r.json()["choices"][0]["message"]["content"], r.json()["prag"]["parametric"]))
    n_sets = len({tuple(p) for _, p in reference if p})
    stats = {"requests": 0, "mismatches": [], "errors": [], "latency": [], "answers": {},
             "by_mode": {m: {"requests": 0, "mismatches": 0, "jobs_mismatched": set()} for m in sorted(set(MODES))}}
    lock = threading.Lock()
    stop = time.time() + seconds
    rss = [_rss_mb(server["pid"])]

    def client(seed: int) -> None:
        local = random.Random(seed)
        with httpx.Client(headers=headers, timeout=300) as c:
            while time.time() < stop:
                i = local.randrange(len(jobs))
                t0 = time.perf_counter()
                try:
                    r = c.post(url, json=jobs[i])
                    body = r.json()
                except Exception as exc:  # noqa: BLE001 - any failure is an error to report
                    with lock:
                        stats["errors"].append(f"{type(exc).__name__}: {exc}")
                    continue
                mode = stats["by_mode"][jobs[i]["model"].removeprefix("prag-")]
                with lock:
                    stats["requests"] += 1
                    mode["requests"] += 1
                    stats["latency"].append(time.perf_counter() - t0)
                    if r.status_code != 200:
                        stats["errors"].append(f"{r.status_code}: {r.text[:200]}")
                        continue
                    got = (body["choices"][0]["message"]["content"], body["prag"]["parametric"])
                    stats["answers"].setdefault(i, []).append(got)
                    if got != reference[i]:
                        mode["mismatches"] += 1
                        mode["jobs_mismatched"].add(i)
                        stats["mismatches"].append({"job": i, "mode": jobs[i]["model"],
                                                    "got": body["choices"][0]["message"]["content"],
                                                    "want": reference[i][0]})

    threads = [threading.Thread(target=client, args=(s,)) for s in range(CLIENTS)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        time.sleep(5)
        rss.append(_rss_mb(server["pid"]))
    for t in threads:
        t.join()
    metrics = httpx.get(server["base"] + "/metrics", headers=headers).text
    lat = sorted(stats["latency"])
    jobs_per_mode = {m: sum(j["model"] == f"prag-{m}" for j in jobs) for m in stats["by_mode"]}
    # jobs answered twice or more under load, and those whose answers under load differed among
    # themselves (the batch changed the answer) rather than only from the one sent alone
    again = {m: [i for i, a in stats["answers"].items() if len(a) > 1 and jobs[i]["model"] == f"prag-{m}"]
             for m in stats["by_mode"]}
    by_mode = {m: {"requests": v["requests"], "mismatches": v["mismatches"], "distinct_jobs": jobs_per_mode[m],
                   "jobs_mismatched": sorted(v["jobs_mismatched"]), "jobs_answered_twice": len(again[m]),
                   "jobs_answers_varied": sorted(i for i in again[m]
                                                 if len({json.dumps(a) for a in stats["answers"][i]}) > 1)}
               for m, v in stats["by_mode"].items()}
    report = {"dtype": SERVER_DTYPE, "clients": CLIENTS, "seconds": seconds, "requests": stats["requests"],
              "distinct_jobs": len(jobs),
              "distinct_adapter_sets": n_sets, "mismatches": len(stats["mismatches"]), "errors": len(stats["errors"]),
              "requests_per_s": stats["requests"] / seconds,
              "latency_p50_s": lat[len(lat) // 2] if lat else None,
              "latency_p95_s": lat[int(0.95 * (len(lat) - 1))] if lat else None,
              "rss_mib_start": rss[0], "rss_mib_max": max(rss), "rss_mib_end": rss[-1],
              "cache_entries_end": _metric(metrics, "prag_adapter_cache_entries"),
              "cache_bytes_end": _metric(metrics, "prag_adapter_cache_bytes"),
              "cache_hits": _metric(metrics, "prag_adapter_cache_hits_total"),
              "cache_misses": _metric(metrics, "prag_adapter_cache_misses_total"),
              "by_mode": by_mode, "first_mismatches": stats["mismatches"][:5], "first_errors": stats["errors"][:5]}
    out = Path(os.environ.get("PRAG_SOAK_REPORT", tmp_path / "soak.json"))
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("\nsoak:", json.dumps(report, indent=2))
    assert stats["requests"] >= CLIENTS
    assert report["errors"] == 0 and report["mismatches"] == 0, report
    assert report["cache_entries_end"] <= 32  # the server's --cache-max-entries
    assert n_sets > 32  # more sets than the cache holds: eviction happened under load
    assert report["rss_mib_max"] < report["rss_mib_start"] + 1024, report
    assert httpx.get(server["base"] + "/health").status_code == 200
