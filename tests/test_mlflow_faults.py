"""MLflow faults seen by a stage as a user runs it: a server that never answers; a server dying during register.

The stage must give up within its reachability timeout (`tracking.REACH_TIMEOUT_S`), with exit code 2, no
traceback and a message naming the server, and write nothing. The time is measured from the moment the
server accepted the stage's connection, so the CLI's start-up on a loaded machine does not count.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.support.e2e import copy_project, dvc, tool_env
from tests.support.mlflow_store import mlflow_server
from tests.support.project import tiny_raw_params
from vae_mlops.tracking import REACH_TIMEOUT_S

pytestmark = pytest.mark.slow


class SilentServer:
    """Accepts TCP connections on 127.0.0.1 and never sends a byte; records when it first accepted."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.first_accept: float | None = None
        self.held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.first_accept = self.first_accept or time.monotonic()
            self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


def test_register_against_a_server_that_never_answers_fails_within_the_timeout(tiny_mirror, tmp_path):
    root = tmp_path / "proj"
    (root / "reports").mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_raw_params()))
    server = SilentServer()
    run_file = root / "reports" / "mlflow_run.json"  # what train left: a run in that server's store
    run_file.write_text(json.dumps({"run_id": "0" * 32, "experiment_id": "1", "tracking_uri": server.url}))
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    try:
        proc = subprocess.run([sys.executable, "-m", "vae_mlops", "register", "--root", str(root)], cwd=root,
                              env=tool_env(MLFLOW_TRACKING_URI=server.url), capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        ended = time.monotonic()
    finally:
        server.close()
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"the MLflow tracking server at {server.url} is unreachable" in proc.stderr
    assert "Timeout" in proc.stderr  # it waited for an answer; the port was open
    assert server.first_accept is not None
    waited = ended - server.first_accept
    assert REACH_TIMEOUT_S - 0.5 < waited < REACH_TIMEOUT_S + 15, waited  # its timeout, not MLflow's minutes
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before  # no registration, no promotion log


def _run_status(db: Path, run_id: str) -> str | None:
    """The run's status as the server's sqlite store holds it (read beside the server, not through it)."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
        row = conn.execute("select status from runs where run_uuid = ?", (run_id,)).fetchone()
    return row[0] if row else None


def test_mlflow_dying_during_register_is_a_clear_error_and_a_rerun_registers_once(tiny_mirror, tmp_path):
    """The server is SIGKILLed once register has reopened the pipeline's run, before it registers anything."""
    repo = copy_project(tmp_path / "repo", **{"train.epochs": 1})
    with mlflow_server(tmp_path / "mlflow") as server:
        env = tool_env(MLFLOW_TRACKING_URI=server.url, VAE_DATA_MIRROR=str(tiny_mirror))
        dvc("repro", "evaluate", cwd=repo, env=env)
        run_id = json.loads((repo / "reports" / "mlflow_run.json").read_text())["run_id"]
        assert _run_status(server.folder / "mlflow.db", run_id) == "FINISHED"
        proc = subprocess.Popen([str(Path(sys.executable).parent / "dvc"), "repro"], cwd=repo, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 300
        while _run_status(server.folder / "mlflow.db", run_id) != "RUNNING":  # register's stage_run reopened it
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.02)
        server.kill(signal.SIGKILL)
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode != 0 and "failed to reproduce 'register'" in out, out
        assert f"lost the MLflow tracking store {server.url}" in out or f"tracking server at {server.url}" in out, out
        assert "Traceback" not in out
        assert not (repo / "reports" / "registration.json").exists()
        log = repo / "reports" / "promotions.jsonl"
        assert not log.exists() or log.read_text() == ""

        server.start()
        rerun = dvc("repro", cwd=repo, env=env)
        assert "Stage 'evaluate' didn't change, skipping" in rerun.stdout + rerun.stderr
        versions = server.api("GET", "model-versions/search", params={"filter": "name='vae-mnist'"})["model_versions"]
        assert [v["run_id"] for v in versions] == [run_id]  # registered once, by the rerun
        assert server.model_version("vae-mnist", "champion")["run_id"] == run_id
        assert len(log.read_text().splitlines()) == 1
