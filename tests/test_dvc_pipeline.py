"""`dvc repro` end to end in a temporary copy of the repo, on tiny data from a file:// mirror."""

from __future__ import annotations

import shutil

import pytest
import yaml

from e2e import copy_project, dvc

pytestmark = pytest.mark.slow


@pytest.fixture
def repo(data_env, tmp_path, monkeypatch):
    monkeypatch.setenv("VAE_DATA_MIRROR", f"file://{data_env}")
    return copy_project(tmp_path / "repo", **{"train.epochs": 1})


def test_dvc_repro_runs_the_pipeline_and_a_second_run_does_nothing(repo):
    dvc("repro", cwd=repo)
    assert (repo / "models" / "vae.pt").is_file()
    assert (repo / "data" / "raw" / "tiny" / "images.parquet").is_file()
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert {"download", "train"} <= set(lock)
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
