"""Test helpers for the Elasticsearch backend: a local server and a recording TLS proxy.

``noida-db`` (PyPI, in the ``test`` extra) is one binary that speaks the Elasticsearch REST
API (it answers as Elasticsearch 8.15). It is started on 127.0.0.1 on a free port, in its
own process group so that stopping it also stops the binary its Python wrapper launches.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

TLS_DIR = Path(__file__).parent / "data" / "es_tls"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NoidaServer:
    """``noida-db start --only elasticsearch`` on loopback; ``url`` once :meth:`start` returned."""

    def __init__(self, data_dir: Path, startup_timeout: float = 30.0):
        self.data_dir = data_dir
        self.timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> NoidaServer:
        exe = shutil.which("noida-db", path=str(Path(sys.executable).parent)) or shutil.which("noida-db")
        if exe is None:
            raise RuntimeError("noida-db is not installed: pip install -e '.[test]' (scripts/setup.sh does)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(self.data_dir / "server.log", "wb")
        self.proc = subprocess.Popen(
            [exe, "start", "--only", "elasticsearch", "--host", "127.0.0.1", "--elasticsearch-port", str(port),
             "--data-dir", str(self.data_dir / "data")],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"noida-db exited with {self.proc.returncode}: {self.read_log()}")
            try:
                with urllib.request.urlopen(self.url, timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"noida-db not ready on {self.url} after {self.timeout:.0f} s: {self.read_log()}")
            time.sleep(0.1)

    def read_log(self) -> str:
        return (self.data_dir / "server.log").read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)  # the process group we started: wrapper + binary
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.log.close()


class TlsProxy:
    """HTTPS on a free loopback port, forwarded as plain bytes to ``target_port``.

    Records every byte the client sent (after decryption) in ``seen``, so a test can check
    which headers went over the wire.
    """

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(TLS_DIR / "cert.pem", TLS_DIR / "key.pem")
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"https://127.0.0.1:{self.sock.getsockname()[1]}"
        self.seen = bytearray()
        self._lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            tls = self.ctx.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError):  # e.g. the client rejected our certificate
            conn.close()
            return
        with tls, socket.create_connection(("127.0.0.1", self.target_port)) as up:
            while True:  # one thread per connection: the SSL object is never used concurrently
                ready = [tls] if tls.pending() else select.select([tls, up], [], [], 30)[0]
                if not ready:
                    return
                for src in ready:
                    try:
                        data = src.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    if src is tls:
                        with self._lock:
                            self.seen += data
                    (up if src is tls else tls).sendall(data)

    def close(self) -> None:
        self.sock.close()
