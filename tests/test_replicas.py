"""Two ``prag serve`` replicas behind HAProxy, configured by the shipped ``deploy/haproxy.cfg``.

Both replicas serve one corpus from ONE shared work dir (BM25 index built beforehand by
``prag index``) and ONE shared adapter store, which they only read; each writes merged
adapters to its own cache dir. Checked:

1. 32 concurrent chat requests through the balancer, each with its own document set (so
   its own merged adapter), all equal to the same request sent alone to replica 1, and
   both replicas served some (``X-Served-By``, the stats socket and the replicas' access
   logs agree);
2. replica 2 killed (SIGKILL of its process group) with requests in flight: every request
   that fails was on replica 2 (the balancer's log says where each failed one went, and
   there are no more failures than requests in flight), and every request sent after the
   kill succeeds with the reference answer (retried/redispatched to replica 1).

Needs the ``haproxy`` binary: ``scripts/install_balancer.sh`` (run by ``scripts/setup.sh``)
installs it; without it this test fails, it is not skipped.
Run it alone:  .venv/bin/python -m pytest -s tests/test_replicas.py
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import random_adapter
from server_fixture import API_KEY, SERVER_DTYPE, WORDS

pytestmark = pytest.mark.vllm

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "deploy" / "haproxy.cfg"
JOBS = 32
MAX_TOKENS = 8
START_TIMEOUT = 900  # two engines compile at once on a busy 2-core machine
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _haproxy() -> str:
    path = shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy")
                                            if os.access(p, os.X_OK)), None)
    if path is None:
        pytest.fail("the haproxy binary is missing: run scripts/install_balancer.sh (scripts/setup.sh runs it)",
                    pytrace=False)
    return path


def _prag() -> list[str]:
    exe = Path(sys.executable).parent / "prag"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "prag_vllm.cli"]


def _stop(proc: subprocess.Popen, sig: int = signal.SIGINT, wait: float = 30) -> None:
    """Stop ``proc`` (gracefully first), then SIGKILL whatever is left of its process group."""
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            proc.wait(timeout=wait)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # vLLM's engine process, or the whole group if still running
    except ProcessLookupError:
        pass
    proc.wait()


def _shm_of_group(pgid: int) -> set[Path]:
    """The /dev/shm files (vLLM's shared-memory queues, semaphores) mapped by the processes of
    group ``pgid``. A SIGKILLed engine cannot unlink them: hundreds of MB of RAM each, left behind."""
    found = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            found |= {Path(line.split(None, 5)[5]) for line in (proc / "maps").read_text().splitlines()
                      if len(line.split(None, 5)) == 6 and line.split(None, 5)[5].startswith("/dev/shm/")}
        except (OSError, IndexError, ValueError):
            continue
    return found


def _stats(sock_path: Path) -> dict[str, dict[str, str]]:
    """HAProxy's ``show stat`` for the replicas backend: server name -> columns."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(sock_path))
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    lines = data.decode().splitlines()
    header = lines[0].lstrip("# ").split(",")
    rows = [dict(zip(header, line.split(","))) for line in lines[1:] if line]
    return {r["svname"]: r for r in rows if r["pxname"] == "replicas" and r["svname"].startswith("replica")}


def _snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for root in roots for p in sorted(root.rglob("*"))
            if p.is_file()}


def _request_lines(text: str) -> list[tuple[str, int, str]]:
    """(server, status, retries) of each chat request in HAProxy's log (``option httplog``: client,
    date, frontend, backend/server, timers, status, ..., conns/retries; a "+": redispatched)."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if '"POST /v1/chat/completions' in line and len(parts) > 10 and "/" in parts[3]:
            out.append((parts[3].split("/", 1)[1], int(parts[5]), parts[10].rsplit("/", 1)[1]))
    return out


def _metric(base: str, name: str) -> float:
    """Sum of a replica's Prometheus samples ``name`` over all their labels."""
    text = httpx.get(base + "/metrics", headers=HEADERS, timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def _access_count(log: Path) -> int:
    return sum('"POST /v1/chat/completions HTTP/1.1" 200' in line for line in log.read_text().splitlines())


def _ask(client: httpx.Client, base: str, job: dict):
    """(status, content, parametric documents, replica) of one request; status None on a transport error."""
    try:
        r = client.post(base + "/v1/chat/completions", json=job)
    except httpx.HTTPError as exc:
        return None, f"{type(exc).__name__}: {exc}", None, None
    if r.status_code != 200:
        return r.status_code, r.text[:200], None, r.headers.get("x-served-by")
    body = r.json()
    return 200, body["choices"][0]["message"]["content"], body["prag"]["parametric"], r.headers.get("x-served-by")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, test_model_dir):
    """Shared work dir and adapter store, two replicas, HAProxy in front; the reference answers."""
    from prag_vllm.adapters import AdapterStore

    haproxy = _haproxy()  # before minutes of engine start
    t_start = time.perf_counter()
    root = tmp_path_factory.mktemp("replicas")
    shared = root / "shared"
    docs = [{"id": f"doc{i}", "title": w,
             "text": f"{w} is a fictional town known for its {w.lower()} festival, held every spring since {1900 + 3 * i}."}
            for i, w in enumerate(WORDS)]
    corpus = shared / "corpus.jsonl"
    store = AdapterStore(shared / "store")
    for i, d in enumerate(docs):
        store.save(d["id"], random_adapter(test_model_dir, seed=i, std=0.05))
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    work = shared / "ws"
    subprocess.run([*_prag(), "index", "--work-dir", str(work), "--corpus", str(corpus)], check=True,
                   capture_output=True, timeout=300)  # the replicas only read the index
    before = _snapshot(store.root, work / "index")

    procs: list[tuple[subprocess.Popen, int]] = []  # and the signal that stops each gracefully
    shm: set[Path] = set()  # the replicas' shared memory, removed at the end if they left it
    logs = []
    replicas = {}
    try:
        for name in ("replica1", "replica2"):
            port = _free_port()
            log_path = root / f"{name}.log"
            log = open(log_path, "w")  # noqa: SIM115 (closed at the end of the module)
            logs.append(log)
            cmd = [*_prag(), "serve", "--corpus", str(corpus), "--work-dir", str(work),
                   "--adapter-store", str(store.root), "--cache-dir", str(root / f"{name}-merged"),
                   "--model", str(test_model_dir), "--dtype", SERVER_DTYPE, "--port", str(port),
                   "--max-model-len", "1024", "--max-loras", "8", "--max-num-seqs", "32", "--max-top-k", "8",
                   "--api-key", API_KEY, "--log-level", "info", "--log-file", str(root / f"{name}.prag.log")]
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    env=dict(os.environ, PYTHONUNBUFFERED="1"))
            procs.append((proc, signal.SIGINT))
            replicas[name] = {"proc": proc, "port": port, "base": f"http://127.0.0.1:{port}", "log": log_path}
        deadline = time.time() + START_TIMEOUT
        for name, rep in replicas.items():
            while True:
                if rep["proc"].poll() is not None:
                    raise RuntimeError(f"{name} exited with {rep['proc'].returncode}:\n"
                                       f"{rep['log'].read_text()[-3000:]}\n{(root / f'{name}.prag.log').read_text()[-3000:]}")
                try:
                    if httpx.get(rep["base"] + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.time() > deadline:
                    raise RuntimeError(f"{name} did not become healthy in {START_TIMEOUT} s")
                time.sleep(1)
        t_replicas = time.perf_counter() - t_start

        lb_port, sock = _free_port(), root / "haproxy.sock"
        env = dict(os.environ, PRAG_LB_BIND=f"127.0.0.1:{lb_port}", PRAG_LB_STATS_BIND=f"127.0.0.1:{_free_port()}",
                   PRAG_LB_STATS_SOCKET=str(sock), PRAG_REPLICA_1=f"127.0.0.1:{replicas['replica1']['port']}",
                   PRAG_REPLICA_2=f"127.0.0.1:{replicas['replica2']['port']}")
        check = subprocess.run([haproxy, "-c", "-f", str(CONFIG)], env=env, capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        lb_log = root / "haproxy.log"
        logs.append(open(lb_log, "w"))  # noqa: SIM115
        lb = subprocess.Popen([haproxy, "-db", "-f", str(CONFIG)], env=env, stdout=logs[-1],
                              stderr=subprocess.STDOUT, start_new_session=True)
        procs.append((lb, signal.SIGTERM))
        deadline = time.time() + 30
        while True:  # both replicas UP according to the active health check
            if lb.poll() is not None:
                raise RuntimeError(f"haproxy exited with {lb.returncode}:\n{lb_log.read_text()[-3000:]}")
            try:
                if [s["status"] for s in _stats(sock).values()] == ["UP", "UP"]:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"haproxy did not see both replicas UP:\n{lb_log.read_text()[-3000:]}")
            time.sleep(0.2)

        rng = random.Random(0)
        pairs = [(a, b) for a in range(len(WORDS)) for b in range(a + 1, len(WORDS))]
        rng.shuffle(pairs)
        jobs = [{"model": "prag-parametric", "top_k": 2, "max_tokens": MAX_TOKENS, "temperature": 0,
                 "messages": [{"role": "user", "content": f"How are {WORDS[a]} and {WORDS[b]} related?"}]}
                for a, b in pairs[:JOBS]]
        t0 = time.perf_counter()
        with httpx.Client(headers=HEADERS, timeout=300) as c:  # the reference: replica 1 directly, one at a time
            reference = []
            for job in jobs:
                status, content, parametric, _ = _ask(c, replicas["replica1"]["base"], job)
                assert status == 200, content
                reference.append((content, parametric))
        t_reference = time.perf_counter() - t0
        sets = {tuple(p) for _, p in reference}
        assert len(sets) == JOBS and all(len(p) == 2 for p in sets), reference  # a merged adapter per request
        print(f"\nreplicas: both healthy after {t_replicas:.0f} s; reference (32 requests alone on replica1): "
              f"{t_reference:.1f} s")
        yield {"lb": f"http://127.0.0.1:{lb_port}", "replicas": replicas, "sock": sock, "lb_log": lb_log,
               "jobs": jobs, "reference": reference, "work": work, "store": store, "before": before,
               "t_start": t_start, "shm": shm}
    finally:
        for proc, sig in reversed(procs):
            shm |= _shm_of_group(proc.pid) if proc.poll() is None else set()
            _stop(proc, sig)
        left = [p for p in shm if p.exists()]
        for path in left:
            path.unlink(missing_ok=True)
        for log in logs:
            log.close()
        print(f"\nreplicas: module done in {time.perf_counter() - t_start:.0f} s (logs in {root}); "
              f"removed {len(left)} shared-memory files the replicas left in /dev/shm")


def _run(base: str, jobs: list[dict], state: dict | None = None) -> list[tuple]:
    """All ``jobs`` at once through ``base``; ``state`` counts requests started and finished."""
    lock = threading.Lock()

    def one(client, job):
        with lock:
            if state is not None:
                state["started"] += 1
        try:
            return _ask(client, base, job)
        finally:
            with lock:
                if state is not None:
                    state["finished"] += 1

    limits = httpx.Limits(max_connections=2 * len(jobs), max_keepalive_connections=2 * len(jobs))
    with httpx.Client(headers=HEADERS, timeout=300, limits=limits) as c, cf.ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(lambda job: one(c, job), jobs))


def test_balanced_answers_equal_one_replica(cluster):
    t0 = time.perf_counter()
    results = _run(cluster["lb"], cluster["jobs"])
    elapsed = time.perf_counter() - t0
    errors = [r for r in results if r[0] != 200]
    assert not errors, errors
    mismatches = [(i, r[1:3], cluster["reference"][i]) for i, r in enumerate(results)
                  if r[1:3] != cluster["reference"][i]]
    assert not mismatches, mismatches
    by_header = {name: sum(r[3] == name for r in results) for name in ("replica1", "replica2")}
    stats = _stats(cluster["sock"])
    by_stats = {name: int(s["stot"]) for name, s in stats.items()}
    rep = cluster["replicas"]
    by_log = {"replica1": _access_count(rep["replica1"]["log"]) - JOBS,  # minus the reference requests
              "replica2": _access_count(rep["replica2"]["log"])}
    print(f"\nbalanced: {JOBS} concurrent requests in {elapsed:.1f} s, all equal to replica1 alone; "
          f"served (X-Served-By) {by_header}, (haproxy stot) {by_stats}, (access logs) {by_log}")
    assert sum(by_header.values()) == JOBS and min(by_header.values()) > 0, by_header
    assert by_stats == by_header == by_log
    # the shared store and index were only read
    assert _snapshot(cluster["store"].root, cluster["work"] / "index") == cluster["before"]


def test_killed_replica_mid_run(cluster):
    jobs, reference, sock = cluster["jobs"], cluster["reference"], cluster["sock"]
    victim, victim_base = cluster["replicas"]["replica2"]["proc"], cluster["replicas"]["replica2"]["base"]
    state = {"started": 0, "finished": 0}
    log_start = cluster["lb_log"].stat().st_size
    # replica2's counters: merged adapters loaded into vLLM (generation follows at once), answers sent
    ready0, done0 = _metric(victim_base, "prag_adapter_ready_seconds_count"), _metric(victim_base, "prag_requests_total")
    cluster["shm"].update(_shm_of_group(victim.pid))  # it cannot remove them after SIGKILL
    with cf.ThreadPoolExecutor(2) as runner:
        t0 = time.perf_counter()
        wave1 = runner.submit(_run, cluster["lb"], jobs, state)
        deadline = time.time() + 120
        while True:  # every request sent, several on replica2, and it is generating answers to some
            in_flight_victim = int(_stats(sock)["replica2"]["scur"])
            generating = _metric(victim_base, "prag_adapter_ready_seconds_count") - ready0
            answered = _metric(victim_base, "prag_requests_total") - done0
            if state["started"] == JOBS and in_flight_victim >= 4 and generating - answered >= 4:
                break
            assert time.time() < deadline and not wave1.done(), (state, in_flight_victim, generating, answered)
            time.sleep(0.02)
        os.killpg(victim.pid, signal.SIGKILL)
        t_kill = time.perf_counter()
        in_flight = state["started"] - state["finished"]
        wave2 = runner.submit(_run, cluster["lb"], jobs)  # sent after the kill
        first, second = wave1.result(), wave2.result()
        t_end = time.perf_counter()
    victim.wait(timeout=30)
    failed = [r for r in first if r[0] != 200]
    requests = _request_lines(cluster["lb_log"].read_bytes()[log_start:].decode(errors="replace"))
    failed_lines = [r for r in requests if r[1] != 200]
    redispatched = [r for r in requests if r[1] == 200 and r[2].startswith("+")]
    stats = _stats(sock)
    print(f"\nkill: replica2 SIGKILLed {t_kill - t0:.1f} s into a run of {JOBS}, with {in_flight_victim} requests "
          f"in flight on it, {generating - answered:.0f} of them generating ({in_flight} in flight in all); "
          f"in-flight requests that failed: {len(failed)}; "
          f"redispatched to replica1: {len(redispatched)}; {JOBS} more sent after the kill: "
          f"{sum(r[0] == 200 for r in second)} succeeded; both runs done {t_end - t_kill:.1f} s after the kill; "
          f"haproxy: replica2 {stats['replica2']['status']}, replica1 {stats['replica1']['status']}")
    for line in failed_lines:
        print("  failed:", line)
    assert len(failed) <= in_flight
    assert all(server == "replica2" for server, _, _ in failed_lines), failed_lines  # only on the killed one
    assert len(failed_lines) == len(failed) and len(requests) == 2 * JOBS, requests
    assert [r[0] for r in second] == [200] * JOBS, [r for r in second if r[0] != 200]
    assert all(r[3] == "replica1" for r in second)
    for results in (first, second):
        assert all(r[1:3] == reference[i] for i, r in enumerate(results) if r[0] == 200)
    # the dead replica is taken out by the active check within fall x inter (3 x 2 s) when no
    # live connection was refused on it (the passive layer-4 check did not fire)
    deadline = time.time() + 20
    while not stats["replica2"]["status"].startswith("DOWN") and time.time() < deadline:
        time.sleep(0.5)
        stats = _stats(sock)
    assert stats["replica2"]["status"].startswith("DOWN") and stats["replica1"]["status"] == "UP", stats
    assert httpx.get(cluster["replicas"]["replica1"]["base"] + "/health").status_code == 200
