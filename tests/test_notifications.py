"""A promotion, a gate refusal and a failed run each send one notification, to a receiver on 127.0.0.1."""

from __future__ import annotations

import json
import os
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

# Before Prefect is imported: its home (profiles, local results) in a temp dir, not the repo's .prefect.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="prefect-home-")

import pytest  # noqa: E402

from prefect import flow  # noqa: E402
from prefect.settings import PREFECT_HOME, temporary_settings  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from pipeline import flows, notify  # noqa: E402


class Receiver(ThreadingHTTPServer):
    """An HTTP server on 127.0.0.1 that records every JSON body POSTed to it."""

    def __init__(self) -> None:
        self.messages: list[dict] = []
        messages = self.messages

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                messages.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/hook"


@pytest.fixture()
def receiver(monkeypatch) -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv(notify.ENV_WEBHOOK, server.url)
    monkeypatch.delenv(notify.ENV_BLOCK, raising=False)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    with temporary_settings(updates={PREFECT_HOME: str(tmp_path_factory.mktemp("prefect-home"))}):
        with prefect_test_harness(server_startup_timeout=180):
            yield


def _summary(decision: str, ran: bool = True) -> dict:
    return {
        "stages": {"register": {"ran": ran, "seconds": 1.0}},
        "mlflow_run_id": "abc",
        "mlflow_url": "http://127.0.0.1:5000/#/runs/abc",
        "registration": {
            "model_name": "vae-mnist", "version": "3", "alias": "champion" if decision == "promoted" else "challenger",
            "decision": decision, "reason": "test.nll_iwae 95 vs champion v2 100", "metric": "test.nll_iwae",
            "value": 95.0, "champion_version": "2", "champion_value": 100.0,
        },
    }  # fmt: skip


def _pipeline_like(summary: dict):
    """A flow with `vae-pipeline`'s own hooks, returning a given run summary (no DVC, no training)."""
    hooks = flows.vae_pipeline

    @flow(name="vae-pipeline-hooks", on_completion=hooks.on_completion_hooks, on_failure=hooks.on_failure_hooks,
          on_crashed=hooks.on_crashed_hooks)  # fmt: skip
    def fake() -> dict:
        return summary

    return fake


@pytest.mark.slow
@pytest.mark.parametrize(
    "decision, words", [("promoted", "promoted to champion"), ("not promoted", "refused by the gate")]
)
def test_a_registration_sends_one_notification(harness, receiver, decision, words):
    _pipeline_like(_summary(decision))()
    assert len(receiver.messages) == 1
    message = receiver.messages[0]
    assert message["subject"] == f"vae-mnist v3 {words}"
    assert "test.nll_iwae 95 vs champion v2 100" in message["body"] and "#/runs/abc" in message["body"]


@pytest.mark.slow
def test_a_run_where_dvc_skipped_register_sends_nothing(harness, receiver):
    _pipeline_like(_summary("promoted", ran=False))()
    assert receiver.messages == []


@pytest.mark.slow
def test_a_failed_pipeline_run_sends_why(harness, receiver, tmp_path):
    """The real `vae-pipeline` flow, in a checkout without params.yaml: it fails before any work, and says so."""
    with flows.in_checkout(tmp_path):
        state = flows.vae_pipeline(return_state=True)
    assert state.is_failed()
    assert len(receiver.messages) == 1
    message = receiver.messages[0]
    assert message["subject"].startswith("vae-pipeline run ") and message["subject"].endswith(" failed")
    assert "params.yaml" in message["body"]


def test_no_destination_sends_nothing_and_a_dead_receiver_never_raises(monkeypatch):
    monkeypatch.delenv(notify.ENV_WEBHOOK, raising=False)
    monkeypatch.delenv(notify.ENV_BLOCK, raising=False)
    assert notify.send("s", "b") is False
    monkeypatch.setenv(notify.ENV_WEBHOOK, "http://127.0.0.1:9/nothing-listens-here")
    assert notify.send("s", "b") is False


def test_the_hooks_are_on_the_flows():
    assert notify.on_pipeline_completed in flows.vae_pipeline.on_completion_hooks
    for f in (flows.vae_pipeline, flows.vae_train):
        assert notify.on_run_failed in f.on_failure_hooks and notify.on_run_failed in f.on_crashed_hooks


def test_the_destination_is_never_a_param():
    params = Path(__file__).resolve().parents[1].joinpath("params.yaml").read_text()
    assert "webhook" not in params.lower() and "notify" not in params.lower()
