"""The servers the project starts listen on 127.0.0.1 only: the MLflow UI (`make ui`) and Prefect (`make serve`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.support.project import ROOT
from tests.support.mlflow_store import fresh_store
from tests.support.servers import wait_until_answers
from vae_mlops.ports import free_port

from pipeline import serve

pytestmark = pytest.mark.slow

LOOPBACK = "127.0.0.1"


def listening_addresses(port: int) -> set[str]:
    """Every local address with a socket listening on `port` (0.0.0.0 or :: would mean every interface)."""
    return {
        c.laddr.ip
        for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
    }


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group this test started, then SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=20)
            return
        except subprocess.TimeoutExpired:
            continue


def test_make_ui_serves_the_mlflow_ui_on_loopback_only(tmp_path):
    fresh_store(tmp_path)  # `make ui` opens ./mlflow.db: a migrated one starts in seconds
    port = free_port()
    venv = Path(sys.executable).parent.parent
    # `-o setup`: the venv exists; run the `ui` target's own recipe, as `make ui` would, from tmp_path.
    make = ["make", "--no-print-directory", "-f", str(ROOT / "Makefile"), "-o", "setup", "ui", f"UI_PORT={port}", f"VENV={venv}"]
    dry = subprocess.run([*make, "-n"], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert dry.startswith("mlflow ui ") and f"sqlite:///{tmp_path}/mlflow.db" in dry
    assert f"--host {LOOPBACK} --port {port}" in dry

    log = tmp_path / "ui.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(make, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # fmt: skip
    try:
        wait_until_answers(f"http://{LOOPBACK}:{port}/health", proc, log)
        assert listening_addresses(port) == {LOOPBACK}
    finally:
        stop_group(proc)
    assert not listening_addresses(port)


def test_the_local_prefect_server_of_make_serve_listens_on_loopback_only(tmp_path):
    port = free_port()
    with serve.local_server(tmp_path / "prefect-home", port) as api_url:  # as `make serve` starts it
        assert api_url == f"http://{LOOPBACK}:{port}/api"
        assert serve.healthy(api_url)
        assert listening_addresses(port) == {LOOPBACK}
    assert not listening_addresses(port)  # stopped with its whole process group
