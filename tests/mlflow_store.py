"""MLflow stores for tests: a migrated sqlite store copied in a blink, and a real `mlflow server`.

Creating an MLflow sqlite database runs its schema migrations (about ten seconds
here); every test store is a copy of one migrated once per test session.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests


@functools.cache
def _template() -> Path:
    from mlflow import MlflowClient

    folder = Path(tempfile.mkdtemp(prefix="mlflow-template-"))
    db = folder / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()  # creates and migrates the schema
    return db


def fresh_store(folder: Path) -> str:
    """An empty, migrated `folder/mlflow.db`; returns its tracking URI."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy2(_template(), folder / "mlflow.db")
    return f"sqlite:///{folder / 'mlflow.db'}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` on 127.0.0.1 in a subprocess, over a sqlite store that outlives restarts."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.folder = folder
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        if not (folder / "mlflow.db").exists():
            fresh_store(folder)

    def start(self, timeout_s: float = 90) -> "MlflowServer":
        mlflow_bin = Path(sys.executable).parent / "mlflow"
        cmd = [
            str(mlflow_bin), "server",
            "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
            "--artifacts-destination", str(self.folder / "mlartifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        log = open(self.folder / "server.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.folder / 'server.log').read_text()[-2000:]}")
            try:
                if requests.get(f"{self.url}/health", timeout=1).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.3)
        self.kill()
        raise RuntimeError(f"mlflow server did not answer in {timeout_s}s")

    def kill(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server and its workers (its own process group)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)

    def api(self, method: str, endpoint: str, **kwargs) -> dict:
        resp = requests.request(method, f"{self.url}/api/2.0/mlflow/{endpoint}", timeout=30, **kwargs)
        resp.raise_for_status()
        return resp.json()
