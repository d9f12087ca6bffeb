"""A real `mlflow server` on loopback that a test can stop and start again (same store, same port).

One worker and no job execution: ready in about 7 s and half a GB (docs: ENVIRONMENT.md).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

READY_TIMEOUT_S = 120.0   # a loaded 2-core machine can take several times the usual 7 s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`start()` / `stop()` any number of times; the SQLite store and artifacts live in `root`."""

    def __init__(self, root: Path, port: int | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def start(self) -> None:
        assert self.proc is None, "already running"
        mlflow = Path(sys.executable).parent / "mlflow"
        log = open(self.root / f"server-{self.starts}.log", "w")
        self.starts += 1
        # its own session: stop() ends the server and its worker processes, nothing else
        self.proc = subprocess.Popen(
            [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            cwd=self.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env=dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))
        log.close()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self.healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                text = (self.root / f"server-{self.starts - 1}.log").read_text()[-3000:]
                raise RuntimeError(f"mlflow server did not become ready:\n{text}")
            time.sleep(0.25)

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None
        # the port must refuse connections before the caller goes on
        while self.healthy():
            time.sleep(0.1)


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path / "mlflow-server")
    server.start()
    try:
        yield server
    finally:
        server.stop()
