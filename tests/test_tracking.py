"""The MLflow door: where runs go, what a pipeline run records, and a logger that outlives its server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from tests.support.e2e import copy_project, run, tool_env
from tests.support.mlflow_store import free_port, fresh_store
from vae_mlops import tracking
from vae_mlops.paths import Paths
from vae_mlops.stages.download import download as run_download
from vae_mlops.stages.evaluate import evaluate as run_evaluate
from vae_mlops.stages.train import train as run_train
from vae_mlops.train import EpochStats


@pytest.fixture
def store(tmp_path, monkeypatch) -> str:
    uri = fresh_store(tmp_path / "store")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture
def dead_server(monkeypatch) -> str:
    """A tracking URI on a loopback port where nothing listens; no retries, so failures are quick."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    return f"http://127.0.0.1:{free_port()}"


def _git_repo(root) -> str:
    root.mkdir(parents=True, exist_ok=True)
    (root / "README").write_text("x\n")
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"]):  # fmt: skip
        subprocess.run(cmd, cwd=root, check=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()


# ---------------------------------------------------------------- the store


def test_default_store_is_the_projects_sqlite_and_the_environment_overrides_it(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    paths = Paths(tmp_path)
    assert tracking.tracking_uri(paths) == f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    assert tracking.local_store_path(tracking.tracking_uri(paths)) == (tmp_path / "mlflow.db").resolve()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri(paths) == "http://127.0.0.1:5000"
    assert tracking.local_store_path("http://127.0.0.1:5000") is None


def test_an_unreachable_server_is_reported_within_seconds(dead_server):
    t0 = time.monotonic()
    with pytest.raises(tracking.TrackingError, match="unreachable.*unset MLFLOW_TRACKING_URI"):
        tracking.check_reachable(dead_server)
    assert time.monotonic() - t0 < 10


def test_a_later_stage_without_the_train_run_file_says_to_run_train(tmp_path, store):
    with pytest.raises(tracking.TrackingError, match="dvc repro train"):
        tracking.resume_run(Paths(tmp_path))


def test_a_run_file_naming_a_run_the_store_lacks_is_a_clear_error(tmp_path, store):
    paths = Paths(tmp_path)
    paths.train_run_file.parent.mkdir(parents=True)
    paths.train_run_file.write_text(json.dumps({"run_id": "0" * 32, "experiment_id": "1", "tracking_uri": "x"}))
    with pytest.raises(tracking.TrackingError, match="cannot be read from .*dvc repro -f train"):
        tracking.resume_run(paths)


# ---------------------------------------------------------------- the pipeline's run


def test_the_train_stage_logs_params_tags_epoch_metrics_and_images_into_one_run(
    tmp_path, data_env, tiny_params, store
):
    root = tmp_path / "project"
    commit = _git_repo(root)
    paths = Paths(root)
    manifest = run_download(tiny_params.data, paths)
    with tracking.train_run(tiny_params, paths, "cpu", manifest) as logger:
        run_train(tiny_params, paths, logger)

    recorded = json.loads(paths.train_run_file.read_text())
    client = tracking.mlflow_client(store)
    r = client.get_run(recorded["run_id"])
    assert r.info.status == "FINISHED"
    assert client.get_experiment(r.info.experiment_id).name == tiny_params.mlflow.experiment
    assert r.data.params == {k: str(v) for k, v in tiny_params.flat().items()}
    tags = r.data.tags
    assert tags["git.commit"] == commit and tags["git.dirty"] == "false"
    assert tags["data.dataset"] == "tiny" and tags["data.hash"] == manifest["data_hash"]
    assert {k.removeprefix("data.sha256.") for k in tags if k.startswith("data.sha256.")} == set(manifest["files"])
    assert tags["device"] == "cpu" and tags["torch.version"] == torch.__version__
    epochs = tiny_params.train.epochs
    for key in tracking.EPOCH_METRICS:
        assert [m.step for m in client.get_metric_history(r.info.run_id, key)] == list(range(1, epochs + 1)), key
    pngs = [a.path for a in client.list_artifacts(r.info.run_id, "images") if a.path.endswith(".png")]
    for name in ("samples", "reconstructions"):  # image_every=1: one picture per epoch each
        steps = sorted(int(p.split("+step+")[1].split("+")[0]) for p in pngs if f"train~{name}+" in p)
        assert steps == list(range(1, epochs + 1)), name

    # the run page: a description, system metrics, and the data as dataset inputs (evaluate adds the test split)
    assert r.info.run_name == tracking.run_name_from_params(tiny_params) and tracking.TAG_DVC_EXPERIMENT not in tags
    assert commit in tags["mlflow.note.content"] and "not a DVC experiment" in tags["mlflow.note.content"]
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(r.data.metrics)
    with tracking.stage_run(paths) as run:
        run_evaluate(tiny_params, paths, run)
    inputs = client.get_run(recorded["run_id"]).inputs.dataset_inputs
    by_context = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset for i in inputs}
    assert set(by_context) == {"train", "validation", "test"}
    n_val = tiny_params.train.val_size
    for split, ds in by_context.items():
        assert ds.name == f"tiny-{split}" and ds.digest == manifest["data_hash"][:36]
        rows = json.loads(ds.profile)["features_shape"][0]
        assert rows == {"validation": n_val}.get(split, rows) and rows > 0
        assert json.loads(ds.source) == {"uri": "data/raw/tiny"}
    assert json.loads(by_context["test"].profile)["targets_shape"] == [json.loads(by_context["test"].profile)["features_shape"][0]]


def test_under_a_dvc_experiment_the_run_is_named_tagged_and_described_after_it(tmp_path, tiny_params, monkeypatch):
    root = tmp_path / "project"
    commit = _git_repo(root)
    manifest = {"data_hash": "h" * 64, "files": {}}
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    assert tracking.TAG_DVC_EXPERIMENT not in tracking.run_tags(tiny_params, Paths(root), "cpu", manifest)
    monkeypatch.setenv("DVC_EXP_NAME", "tidy-mice")
    tags = tracking.run_tags(tiny_params, Paths(root), "cpu", manifest)
    assert tags["dvc.experiment"] == "tidy-mice" and tracking.run_name(tiny_params) == "tidy-mice"
    assert "DVC experiment `tidy-mice`" in tags["mlflow.note.content"] and commit in tags["mlflow.note.content"]


def test_inside_dvcs_temporary_copy_the_store_is_the_workspaces(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    workspace = tmp_path / "ws"
    temp_copy = workspace / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    temp_copy.mkdir(parents=True)
    assert tracking.workspace_root(workspace) == workspace.resolve()
    assert tracking.workspace_root(temp_copy) == workspace.resolve()  # by DVC's layout alone
    assert tracking.tracking_uri(Paths(temp_copy)) == f"sqlite:///{(workspace / 'mlflow.db').resolve()}"
    # what DVC's queue sets in each stage's environment: DVC_ROOT is the workspace
    monkeypatch.setenv("DVC_ROOT", str(workspace))
    assert tracking.workspace_root(temp_copy) == workspace.resolve()
    elsewhere = tmp_path / "other-repo"
    elsewhere.mkdir()
    assert tracking.workspace_root(elsewhere) == elsewhere.resolve()  # a DVC_ROOT that does not hold it: ignored
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri(Paths(temp_copy)) == "http://127.0.0.1:5000"


def test_only_rank_zero_opens_a_run(tmp_path, tiny_params, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with tracking.train_run(tiny_params, Paths(tmp_path), "cpu", {}) as logger:
        assert logger is None
    assert not Paths(tmp_path).train_run_file.exists()


def test_the_logger_survives_a_dead_server_and_fails_the_stage_at_the_end(tmp_path, dead_server):
    paths = Paths(tmp_path)
    paths.train_run_file.parent.mkdir(parents=True)
    paths.train_run_file.write_text("{}")
    logger = tracking.MlflowRunLogger(tracking.PipelineRun("0" * 32, "1", dead_server))
    t0 = time.monotonic()
    for epoch in (1, 2, 3):  # none of these may raise: training must go on
        logger.log_epoch(EpochStats(epoch, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.1))
        logger.log_images({"samples": torch.zeros(3, 4, 4)}, epoch)
    assert logger.failure.startswith("epoch 1:")
    assert time.monotonic() - t0 < 30  # after the first failure nothing more is tried
    with pytest.raises(tracking.TrackingError, match=r"Training finished.*kept.*rerun `dvc repro`.*without retraining"):
        logger.finish(paths)
    assert not paths.train_run_file.exists()  # it named a run that misses epochs


@pytest.mark.slow
def test_train_command_stops_before_reading_data_when_the_server_is_unreachable(tmp_path, tiny_mirror, dead_server):
    """An unreachable tracking server is a clear error before any work (no data, no model)."""
    repo = copy_project(tmp_path / "repo")
    env = tool_env(MLFLOW_TRACKING_URI=dead_server, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    t0 = time.monotonic()
    proc = run([sys.executable, "-m", "vae_mlops", "train"], repo, env, check=False)
    assert proc.returncode == 2, proc.stderr
    assert f"the MLflow tracking server at {dead_server} is unreachable" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (repo / "models").exists() and not (repo / "data" / "raw").exists()  # data/incoming is in git
    assert time.monotonic() - t0 < 120  # mostly imports; the check itself takes milliseconds


# ---------------------------------------------------------------- MLflow's global state


def test_use_store_points_mlflow_at_a_store_for_the_block_and_restores_what_was_there(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    mlflow.set_tracking_uri(None)
    uri = f"sqlite:///{tmp_path / 'a.db'}"
    with tracking.use_store(uri):
        assert mlflow.get_tracking_uri() == uri == mlflow.get_registry_uri() == os.environ["MLFLOW_TRACKING_URI"]
    assert not mlflow.is_tracking_uri_set() and "MLFLOW_TRACKING_URI" not in os.environ

    # a store chosen by the environment: restored, and MLflow still follows the environment afterwards
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    with tracking.use_store(uri):
        assert mlflow.get_tracking_uri() == uri
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:1" == mlflow.get_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:2")
    assert mlflow.get_tracking_uri() == "http://127.0.0.1:2"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")

    # a store set explicitly before: set again after
    explicit = f"sqlite:///{tmp_path / 'explicit.db'}"
    mlflow.set_tracking_uri(explicit)
    try:
        with tracking.use_store(uri):
            assert mlflow.get_tracking_uri() == uri
        assert mlflow.get_tracking_uri() == explicit
    finally:
        mlflow.set_tracking_uri(None)
        os.environ.pop("MLFLOW_TRACKING_URI", None)


def test_the_mlflow_door_touches_no_private_mlflow_state():
    import re
    from pathlib import Path

    source = Path(tracking.__file__)
    files = sorted(source.parent.glob("*.py")) if source.name == "__init__.py" else [source]
    for f in files:
        private = re.findall(r"mlflow(?:\.\w+)*\._\w+|\b_(?:tracking|registry)_uri\b", f.read_text())
        assert not private, f"{f.name} reaches into MLflow's private state: {sorted(set(private))}"
