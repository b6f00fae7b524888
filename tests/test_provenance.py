"""`git.dirty` and the run's description judge the sources, not the outputs DVC deletes and rewrites."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.support.e2e import copy_project, dvc
from tests.support.mlflow_store import fresh_store
from vae_mlops import provenance
from vae_mlops.tracking.store import mlflow_client


def _train_run_tags(repo) -> dict[str, str]:
    recorded = json.loads((repo / "reports" / "mlflow_run.json").read_text())
    return mlflow_client(recorded["tracking_uri"]).get_run(recorded["run_id"]).data.tags


def test_dvc_outputs_are_read_from_dvc_yaml_with_interpolations_as_globs(tmp_path):
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  s:\n    cmd: x\n    outs:\n      - data/raw/${data.dataset}\n      - m.pt:\n          cache: false\n"
        "    metrics:\n      - r.json\n    plots:\n      - p/\n"
    )
    assert provenance.dvc_outputs(tmp_path) == ["dvc.lock", "data/raw/*", "m.pt", "r.json", "p"]


@pytest.mark.slow
def test_dvc_repro_in_a_clean_clone_is_clean_and_an_edited_source_is_dirty(data_env, tmp_path, monkeypatch):
    monkeypatch.setenv("VAE_DATA_MIRROR", f"file://{data_env}")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    origin = copy_project(tmp_path / "origin", store=False, **{"train.epochs": 1})
    # A committed output of train, as in the project: DVC deletes it before the stage runs.
    (origin / "reports").mkdir()
    (origin / "reports" / "train_history.csv").write_text("epoch\n")
    subprocess.run(["git", "add", "-A"], cwd=origin, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "history"], cwd=origin, check=True)
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(origin), str(clone)], check=True)
    fresh_store(clone)

    dvc("repro", "train", cwd=clone)
    tags = _train_run_tags(clone)
    assert tags["git.dirty"] == "false", tags
    assert "uncommitted" not in tags["mlflow.note.content"], tags["mlflow.note.content"]

    errors_py = clone / "src" / "vae_mlops" / "errors.py"  # a code dep of train: the stage reruns
    errors_py.write_text(errors_py.read_text() + "\n# an edit\n")
    dvc("repro", "train", cwd=clone)
    tags = _train_run_tags(clone)
    assert tags["git.dirty"] == "true", tags
    assert "with uncommitted changes" in tags["mlflow.note.content"], tags["mlflow.note.content"]
