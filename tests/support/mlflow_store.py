"""MLflow stores for tests: a migrated sqlite store copied in a blink, and a real `mlflow server`.

Creating an MLflow sqlite database runs its schema migrations (slow: BENCHMARKS.md);
every test store is a copy of one migrated once per test session.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import requests

from pipeline import procs
from vae_mlops.ports import free_port


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


class MlflowRestReads:
    """Reads through a tracking server's REST API, no MLflow client; `api(method, endpoint, **kw)` makes the call."""

    def api(self, method: str, endpoint: str, **kwargs) -> dict:
        raise NotImplementedError

    def runs_of(self, experiment_id: str) -> list[dict]:
        """Every run of the experiment, oldest first; params and tags as dicts, metrics as key -> latest value."""
        found = self.api("POST", "runs/search", json={"experiment_ids": [experiment_id]}).get("runs", [])
        for run in found:
            data = run.setdefault("data", {})
            for kind in ("params", "tags"):
                data[kind] = as_dict(data.get(kind, []))
            data["metrics"] = {m["key"]: m["value"] for m in data.get("metrics", [])}
        return sorted(found, key=lambda r: r["info"]["start_time"])

    def metric_steps(self, run_id: str, key: str) -> list[int]:
        history = self.api("GET", "metrics/get-history", params={"run_id": run_id, "metric_key": key})
        return sorted(m["step"] for m in history.get("metrics", []))

    def artifacts(self, run_id: str, path: str = "") -> list[str]:
        listing = self.api("GET", "artifacts/list", params={"run_id": run_id, "path": path})
        return [f["path"] for f in listing.get("files", [])]


class MlflowServer(MlflowRestReads):
    """`mlflow server` on 127.0.0.1 in a subprocess, over a sqlite store that outlives restarts."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.folder = folder
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        if not (folder / "mlflow.db").exists():
            fresh_store(folder)

    def start(self, timeout_s: float = 90) -> "MlflowServer":
        cmd = [
            procs.venv_bin("mlflow"), "server",
            "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
            "--artifacts-destination", str(self.folder / "mlartifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        log = open(self.folder / "server.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
        proc = self.proc
        try:
            procs.wait_until(lambda: procs.http_ok(f"{self.url}/health"), timeout_s, "mlflow server",
                             alive=lambda: proc.poll() is None)  # fmt: skip
        except procs.NotReady as exc:
            self.kill()
            raise RuntimeError(f"{exc}: {(self.folder / 'server.log').read_text()[-2000:]}") from None
        return self

    def kill(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server and its workers (its own process group, even once its leader has exited)."""
        if self.proc is not None:
            procs.stop_process_group(self.proc, grace_s=20.0, first=sig)

    def api(self, method: str, endpoint: str, **kwargs) -> dict:
        resp = requests.request(method, f"{self.url}/api/2.0/mlflow/{endpoint}", timeout=30, **kwargs)
        resp.raise_for_status()
        return resp.json()

    # What a user or another tool sees: the server's REST API only, no MLflow client.

    def runs(self, experiment: str) -> list[dict]:
        """Every run of the experiment named `experiment`, oldest first; params and tags as dicts."""
        exp = self.api("GET", "experiments/get-by-name", params={"experiment_name": experiment})["experiment"]
        return self.runs_of(exp["experiment_id"])

    def model_version(self, name: str, alias: str) -> dict:
        mv = self.api("GET", "registered-models/alias", params={"name": name, "alias": alias})["model_version"]
        mv["tags"] = as_dict(mv.get("tags", []))
        return mv


def as_dict(items: list[dict]) -> dict[str, str]:
    """The REST API's `[{"key": k, "value": v}, ...]` as `{k: v}`."""
    return {item["key"]: item.get("value", "") for item in items}


@contextlib.contextmanager
def mlflow_server(folder: Path, port: int | None = None) -> Iterator[MlflowServer]:
    """A started `MlflowServer` over `folder`, killed (with its workers) when the block ends."""
    server = MlflowServer(folder, port)
    try:
        yield server.start()
    finally:
        server.kill()
