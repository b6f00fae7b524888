"""`dvc repro` end to end in a temporary copy of the repo, on tiny data from a file:// mirror."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import yaml

from tests.support.e2e import copy_project, dvc
from vae_mlops import tracking
from vae_mlops.metrics import METRIC_KEYS

pytestmark = pytest.mark.slow


@pytest.fixture
def repo(data_env, tmp_path, monkeypatch):
    monkeypatch.setenv("VAE_DATA_MIRROR", f"file://{data_env}")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the project's own sqlite store
    repo = copy_project(tmp_path / "repo", **{"train.epochs": 1})
    return repo


def _mlflow_run(repo):
    """The pipeline's MLflow run, as recorded by the train stage, read from the repo's store."""
    recorded = json.loads((repo / "reports" / "mlflow_run.json").read_text())
    assert recorded["tracking_uri"] == f"sqlite:///{(repo / 'mlflow.db').resolve()}"
    client = tracking.mlflow_client(recorded["tracking_uri"])
    return client, client.get_run(recorded["run_id"])


def test_dvc_repro_runs_the_pipeline_and_a_second_run_does_nothing(repo):
    dvc("repro", cwd=repo)
    assert (repo / "models" / "vae.pt").is_file()
    assert not list((repo / "data" / "raw" / "tiny").glob("*.parquet"))  # the per-image table is not written
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert {"download", "train", "evaluate", "register"} <= set(lock)
    metrics = json.loads((repo / "reports" / "metrics.json").read_text())
    assert set(METRIC_KEYS) <= set(metrics)
    assert "test.nll_iwae" in dvc("metrics", "show", cwd=repo).stdout
    assert {p.stem for p in (repo / "reports" / "evaluate").glob("*.png")} >= {"latent_map", "loss_curves"}

    # One MLflow run holds params, per-epoch metrics, images, test metrics; its model is the champion.
    client, run = _mlflow_run(repo)
    assert run.info.status == "FINISHED" and run.data.params["train.epochs"] == "1"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")] == [1]
    assert set(METRIC_KEYS) <= set(run.data.metrics)
    assert any(a.path.endswith(".png") for a in client.list_artifacts(run.info.run_id, "images"))
    assert {a.path for a in client.list_artifacts(run.info.run_id, "evaluate")} >= {"evaluate/latent_map.png"}
    registration = json.loads((repo / "reports" / "registration.json").read_text())
    assert (registration["version"], registration["alias"]) == ("1", "champion")
    champion = client.get_model_version_by_alias("vae-mnist", "champion")
    assert champion.run_id == run.info.run_id and champion.tags["data.dataset"] == "tiny"

    from vae_mlops import model_store

    x = np.random.default_rng(0).random((3, 784), dtype=np.float32)
    model = model_store.load_pyfunc("models:/vae-mnist@champion", f"sqlite:///{repo / 'mlflow.db'}")
    assert model.predict(x)["values"].shape == (3, 784)
    assert model.predict(x, params={"output": "mu"})["values"].shape == (3, 4)
    assert lock["train"]["params"]["params.yaml"]["train"]["epochs"] == 1
    outs = {o["path"] for o in lock["train"]["outs"]}
    assert {"models/vae.pt", "models/checkpoints", "reports/train_history.csv"} <= outs
    second = dvc("repro", cwd=repo)
    assert "Data and pipelines are up to date" in second.stdout + second.stderr
    status = dvc("status", cwd=repo)
    assert "up to date" in status.stdout


def test_push_and_pull_work_offline_with_the_local_remote(repo):
    dvc("repro", cwd=repo)
    dvc("push", cwd=repo)
    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / "data" / "raw" / "tiny")
    (repo / "models" / "vae.pt").unlink()
    dvc("pull", cwd=repo)
    assert (repo / "models" / "vae.pt").is_file() and (repo / "data" / "raw" / "tiny" / "manifest.json").is_file()
    assert "up to date" in dvc("status", cwd=repo).stdout


def test_changing_a_param_reruns_training_only(repo):
    dvc("repro", cwd=repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["epochs"] = 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = dvc("repro", cwd=repo)
    text = out.stdout + out.stderr
    assert "Stage 'download' didn't change, skipping" in text and "Running stage 'train'" in text
    # A new MLflow run and a second version that went through the gate; the promotion log kept both lines.
    decisions = [json.loads(line) for line in (repo / "reports" / "promotions.jsonl").read_text().splitlines()]
    assert [d["version"] for d in decisions] == ["1", "2"] and decisions[1]["champion_version"] == "1"
    assert len({d["run_id"] for d in decisions}) == 2
    assert "up to date" in dvc("status", cwd=repo).stdout
