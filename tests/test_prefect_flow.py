"""The `vae-pipeline` flow end to end on tiny data, under `prefect_test_harness`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# Before Prefect is imported: its home (profiles, local results) in a temp dir, not the repo's .prefect.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="prefect-home-")

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from tests.support.checkpoints import checkpoints, same_weights, wait_for  # noqa: E402
from tests.support.e2e import copy_project, dvc, tool_env  # noqa: E402

from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.filters import (  # noqa: E402
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterParentFlowRunId,
)
from prefect.settings import PREFECT_HOME, temporary_settings  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from pipeline import flows  # noqa: E402

pytestmark = pytest.mark.slow

# Outputs whose bytes differ between two runs on the same params: timings in the
# history, run ids, timestamps. The rest must be byte-identical.
RUN_SPECIFIC = {
    "models/vae.pt", "models/checkpoints", "reports/train_history.csv", "reports/mlflow_run.json",
    "reports/registration.json", "reports/promotions.jsonl", "reports/compare.html", "reports/compare.md",
}  # fmt: skip


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    with temporary_settings(updates={PREFECT_HOME: str(tmp_path_factory.mktemp("prefect-home"))}):
        with prefect_test_harness(server_startup_timeout=180):
            yield


class FlakyMirror(ThreadingHTTPServer):
    """The tiny mirror over HTTP on 127.0.0.1, answering 503 to its first `failures` requests."""

    def __init__(self, folder: Path, failures: int) -> None:
        self.failures, self.failed, self.served = failures, 0, 0
        lock = threading.Lock()
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(folder), **kwargs)

            def do_GET(self):
                with lock:
                    fail = server.failed < server.failures
                    server.failed += fail
                    server.served += not fail
                if fail:
                    self.send_error(503, "injected transient fault")
                    return
                super().do_GET()

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/"

    def __enter__(self):
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()


def _task_runs(flow_run_id) -> dict[str, list]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    by_name: dict[str, list] = {}
    for run in runs:
        by_name.setdefault(run.name, []).append(run)
    return by_name


def _lock(repo: Path) -> dict:
    return yaml.safe_load((repo / "dvc.lock").read_text())["stages"]


def _assert_same_lock(flow_lock: dict, repro_lock: dict) -> None:
    assert list(flow_lock) == list(repro_lock)
    for stage, a in flow_lock.items():
        b = repro_lock[stage]
        assert a["cmd"] == b["cmd"] and a.get("params") == b.get("params"), stage
        deps_a = {d["path"]: d["md5"] for d in a.get("deps", []) if d["path"] not in RUN_SPECIFIC}
        deps_b = {d["path"]: d["md5"] for d in b.get("deps", []) if d["path"] not in RUN_SPECIFIC}
        assert deps_a == deps_b, stage
        assert [o["path"] for o in a["outs"]] == [o["path"] for o in b["outs"]], stage
        for oa, ob in zip(a["outs"], b["outs"]):
            if oa["path"] not in RUN_SPECIFIC:
                assert oa["md5"] == ob["md5"], f"{stage}: {oa['path']}"


def _cached(repo: Path, md5: str) -> bool:
    return (repo / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]).is_file()


def test_flow_runs_every_stage_retries_a_transient_download_failure_and_matches_dvc_repro(
    harness, tiny_mirror, tmp_path, monkeypatch
):
    overrides = {"model.latent_dim": 3}
    flow_repo = copy_project(tmp_path / "flow", **{"data.retries": 1, "train.epochs": 1})
    repro_repo = copy_project(tmp_path / "repro", **{"data.retries": 1, "train.epochs": 1, **overrides})
    # the reference: plain `dvc repro` on the same params, alongside the flow
    reference = subprocess.Popen(
        [str(Path(sys.executable).parent / "dvc"), "repro"], cwd=repro_repo,
        env=tool_env(VAE_DATA_MIRROR=str(tiny_mirror)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        with FlakyMirror(tiny_mirror, failures=1) as mirror:
            monkeypatch.setenv("VAE_DATA_MIRROR", mirror.url)
            with flows.in_checkout(flow_repo):
                state = flows.vae_pipeline(overrides=overrides, return_state=True)
        ref_out, _ = reference.communicate(timeout=900)
    finally:
        reference.kill()
    assert state.is_completed(), state.message
    assert reference.returncode == 0, ref_out
    assert mirror.failed == 1 and mirror.served >= 4

    # task states: download failed once and was retried; every stage completed
    run_id = state.state_details.flow_run_id
    tasks = _task_runs(run_id)
    assert {"download", "evaluate", "register"} <= set(tasks)
    download = tasks["download"][0]
    assert download.state.is_completed() and download.run_count == 2
    with get_client(sync_client=True) as client:
        history = [s.name for s in client.read_task_run_states(download.id)]
        (child,) = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id]))
        )
        summary = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[flows.SUMMARY_KEY])))
    assert "Retrying" in history
    assert all(t[0].state.is_completed() for t in tasks.values())
    assert child.state.is_completed() and _task_runs(child.id)["train"][0].state.is_completed()

    # DVC versioned it all: dvc.lock as `dvc repro` writes it, outputs in the cache, nothing left to run
    flow_lock = _lock(flow_repo)
    _assert_same_lock(flow_lock, _lock(repro_repo))
    assert "Data and pipelines are up to date" in dvc("status", cwd=flow_repo).stdout
    for out in flow_lock["train"]["outs"]:
        if out["path"] in ("models/vae.pt", "reports/mlflow_run.json"):
            assert _cached(flow_repo, out["md5"]), out["path"]
    weights = [torch.load(r / "models" / "vae.pt", weights_only=True)["state_dict"] for r in (flow_repo, repro_repo)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    metrics = [yaml.safe_load((r / "reports" / "metrics.json").read_text()) for r in (flow_repo, repro_repo)]
    assert metrics[0] == pytest.approx(metrics[1], rel=1e-5)

    # the summary artifact, and the overrides recorded in the MLflow run
    result = state.result()
    markdown = str(summary[-1].data)
    assert result["mlflow_run_id"] and result["mlflow_run_id"] in markdown and result["mlflow_url"] in markdown
    assert "test.nll_iwae" in markdown and result["registration"]["decision"] in markdown
    from mlflow.tracking import MlflowClient

    run = MlflowClient(f"sqlite:///{flow_repo / 'mlflow.db'}").get_run(result["mlflow_run_id"])
    assert run.data.params["model.latent_dim"] == "3"
    assert yaml.safe_load(run.data.tags["vae.overrides"]) == overrides
    assert run.data.tags["prefect.parent_flow_run_id"] == str(run_id)


def test_bad_flow_parameters_are_one_error_before_any_work(harness, tiny_mirror, tmp_path, capsys):
    repo = copy_project(tmp_path / "bad")
    before = (repo / "params.yaml").read_text()
    bad = {"train.epochs": 0, "model.latent_dim": "wide", "train.epoch": 3}
    with flows.in_checkout(repo):
        state = flows.vae_pipeline(overrides=bad, dataset="nope", return_state=True)
    assert state.is_failed()
    for problem in ("4 problem(s)", "train.epochs: must be > 0", "model.latent_dim: expected int",
                    "train.epoch: unknown key", "data.dataset: must be one of"):  # fmt: skip
        assert problem in state.message, state.message
    # a value Prefect itself cannot take as the parameter's type
    with flows.in_checkout(repo):
        typed = flows.vae_pipeline(epochs="ten", return_state=True)
    assert typed.is_failed() and "epochs" in typed.message
    for s in (state, typed):
        assert _task_runs(s.state_details.flow_run_id) == {}
    assert (repo / "params.yaml").read_text() == before
    assert not (repo / "data" / "raw").exists() and not (repo / "dvc.lock").exists()  # data/incoming is in git

    # `make flow`'s entry point: one message, exit code 2, before any Prefect run
    capsys.readouterr()  # what the setup printed (MLflow's first store migration logs, run alone)
    assert flows.main(["--root", str(repo), "-S", "train.epochs=0", "--latent-dim", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 2 problem(s)") and "Traceback" not in err
    assert "train.epochs: must be > 0" in err and "model.latent_dim: must be > 0" in err


def test_flow_after_a_sigkilled_dvc_repro_resumes_from_the_checkpoint(harness, tiny_mirror, tmp_path, monkeypatch):
    """The SIGKILL row of docs/faults.md, rerun through the flow rather than `dvc repro`."""
    from vae_mlops import checkpoint

    monkeypatch.setenv("VAE_DATA_MIRROR", str(tiny_mirror))
    epochs = {"train.epochs": 40}
    straight = copy_project(tmp_path / "straight", **epochs)
    dvc("repro", "train", cwd=straight)
    killed = copy_project(tmp_path / "killed", **epochs)
    proc = subprocess.Popen([str(Path(sys.executable).parent / "dvc"), "repro"], cwd=killed, env=tool_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    wait_for(lambda: any(p.name == "epoch-0003.pt" for p in checkpoints(killed)), proc=proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = checkpoint.load(checkpoints(killed)[-1])["history"]  # timings included: a retrain would differ

    with flows.in_checkout(killed):
        state = flows.vae_pipeline(return_state=True)

    assert state.is_completed(), state.message
    final = checkpoint.load(killed / "models" / "vae.pt")["history"]
    assert final[: len(saved)] == saved and len(final) == 40
    assert same_weights(straight / "models" / "vae.pt", killed / "models" / "vae.pt")
