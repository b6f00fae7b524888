"""Two pipeline runs against a real `mlflow server`, seen the way a user or another tool sees them: its REST API."""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.support.project import ROOT
from tests.support.e2e import copy_project, dvc, run, tool_env
from tests.support.mlflow_store import MlflowServer, mlflow_server
from vae_mlops import atomic, data, tracking
from vae_mlops.metrics import METRIC_KEYS

pytestmark = pytest.mark.slow

EPOCHS = 2
MODEL = "vae-mnist"
EVAL_PICTURES = {"latent_map", "interpolation", "samples", "reconstructions", "loss_curves"}


class Pipelines:
    """What the module's tests share: the server, the repo, and its two pipeline runs (oldest first)."""

    def __init__(self, server: MlflowServer, repo: Path, env: dict[str, str]) -> None:
        self.server, self.repo, self.env = server, repo, env
        self.runs = server.runs("vae-mnist")


@pytest.fixture(scope="module")
def pipelines(tiny_mirror, tmp_path_factory):
    """`dvc repro` with latent_dim 4, then `dvc exp run -S model.latent_dim=2`, both logging to one server."""
    base = tmp_path_factory.mktemp("mlflow-server")
    with mlflow_server(base / "server") as server:
        repo = copy_project(base / "repo", **{"train.epochs": EPOCHS, "model.latent_dim": 4})
        env = tool_env(MLFLOW_TRACKING_URI=server.url, VAE_DATA_MIRROR=f"file://{tiny_mirror}")
        dvc("repro", cwd=repo, env=env)
        dvc("exp", "run", "-S", "model.latent_dim=2", cwd=repo, env=env)
        yield Pipelines(server, repo, env)


def test_each_pipeline_run_is_one_finished_mlflow_run_with_its_flattened_params(pipelines):
    runs = pipelines.runs
    assert len(runs) == 2
    assert [r["info"]["status"] for r in runs] == ["FINISHED", "FINISHED"]
    assert [r["data"]["params"]["model.latent_dim"] for r in runs] == ["4", "2"]
    first, second = (r["data"]["params"] for r in runs)
    assert {k for k in first if first[k] != second.get(k)} == {"model.latent_dim"}
    assert first["train.epochs"] == str(EPOCHS) and first["data.dataset"] == "tiny"
    # `dvc repro` names the run after its settings; `dvc exp run` after the DVC experiment, tagged with it
    assert runs[0]["info"]["run_name"] == f"tiny-bernoulli-h64-z4-e{EPOCHS}"
    assert "dvc.experiment" not in runs[0]["data"]["tags"]
    assert runs[1]["info"]["run_name"] == runs[1]["data"]["tags"]["dvc.experiment"] != ""
    recorded = json.loads((pipelines.repo / "reports" / "mlflow_run.json").read_text())
    assert recorded["run_id"] == runs[1]["info"]["run_id"] and recorded["tracking_uri"] == pipelines.server.url


def test_the_documented_dvc_commands_compare_the_runs(pipelines):
    shown = dvc("exp", "show", "--csv", cwd=pipelines.repo, env=pipelines.env).stdout
    rows = list(csv.DictReader(io.StringIO(shown)))
    experiments = [r for r in rows if r["rev"] not in ("workspace", "main")]
    assert [r["model.latent_dim"] for r in experiments] == ["2"]  # main holds 4; the workspace, the applied 2
    logged = pipelines.runs[1]["data"]["metrics"]["test.nll_iwae"]
    assert float(experiments[0]["test.nll_iwae"]) == pytest.approx(logged)
    assert "test.nll_iwae" in dvc("metrics", "diff", cwd=pipelines.repo, env=pipelines.env).stdout


def test_every_epoch_is_logged_with_its_epoch_as_step(pipelines):
    for r in pipelines.runs:
        for key in tracking.EPOCH_METRICS:
            assert pipelines.server.metric_steps(r["info"]["run_id"], key) == list(range(1, EPOCHS + 1)), key


def test_the_test_metrics_sit_in_the_same_run(pipelines):
    repo_metrics = json.loads((pipelines.repo / "reports" / "metrics.json").read_text())
    for r in pipelines.runs:
        assert set(METRIC_KEYS) | {"evaluate/seconds"} <= set(r["data"]["metrics"])
        # logged by evaluate, then once more by register with the logged model's id (MLflow 3 links them)
        assert pipelines.server.metric_steps(r["info"]["run_id"], "test.elbo") == [0, 0]
    assert {k: pipelines.runs[1]["data"]["metrics"][k] for k in METRIC_KEYS} == pytest.approx(repo_metrics)


def test_runs_are_tagged_with_commit_data_dataset_device_and_torch(pipelines):
    commit = run(["git", "rev-parse", "HEAD"], pipelines.repo).stdout.strip()
    manifest = data.read_manifest(pipelines.repo / "data" / "raw" / "tiny")
    # `dvc exp run -S` edits params.yaml in the workspace: the second run comes from a dirty tree.
    assert [r["data"]["tags"]["git.dirty"] for r in pipelines.runs] == ["false", "true"]
    for r in pipelines.runs:
        tags = r["data"]["tags"]
        assert tags["git.commit"] == commit == tags["mlflow.source.git.commit"]
        assert tags["data.dataset"] == "tiny" and tags["data.hash"] == manifest["data_hash"]
        assert {f"data.sha256.{name}": sha for name, sha in manifest["files"].items()}.items() <= tags.items()
        assert tags["device"] == "cpu" and tags["torch.version"] == torch.__version__


def _image_steps(paths: list[str], key: str) -> list[int]:
    """Steps of the PNGs `log_image(key=...)` stored: `images/<key with / as ~>+step+<n>+...png`."""
    pattern = re.compile(re.escape("images/" + key.replace("/", "~")) + r"\+step\+(\d+)\+.*\.png")
    return sorted(int(m.group(1)) for m in map(pattern.fullmatch, paths) if m)


def test_image_grids_are_logged_per_epoch_and_the_evaluation_pictures_beside_them(pipelines):
    server = pipelines.server
    for r in pipelines.runs:
        run_id = r["info"]["run_id"]
        assert {"images", "evaluate"} <= set(server.artifacts(run_id))
        images = server.artifacts(run_id, "images")
        for key in ("train/samples", "train/reconstructions"):  # tiny params: image_every=1
            assert _image_steps(images, key) == list(range(1, EPOCHS + 1)), key
        assert set(server.artifacts(run_id, "evaluate")) == {f"evaluate/{n}.png" for n in EVAL_PICTURES}


def test_each_run_registers_a_version_and_the_better_one_is_champion(pipelines):
    server = pipelines.server
    model = server.api("GET", "registered-models/get", params={"name": MODEL})["registered_model"]
    aliases = {a["alias"]: a["version"] for a in model.get("aliases", [])}
    champion = server.model_version(MODEL, "champion")
    found = server.api("GET", "model-versions/search", params={"filter": f"name='{MODEL}'"})["model_versions"]
    by_run = {mv["run_id"]: mv["version"] for mv in found}
    assert set(by_run) == {r["info"]["run_id"] for r in pipelines.runs}  # one version per run
    assert champion["version"] == aliases["champion"] and champion["status"] == "READY"

    first, second = (r["data"]["metrics"]["test.nll_iwae"] for r in pipelines.runs)
    promoted = second < first  # min_delta 0: the second run wins only on a strict improvement
    winner = pipelines.runs[1 if promoted else 0]["info"]["run_id"]
    assert champion["run_id"] == winner
    assert aliases.get("challenger") == (None if promoted else by_run[pipelines.runs[1]["info"]["run_id"]])
    assert json.loads(champion["tags"]["promotion"])["decision"] == "promoted"
    assert champion["tags"]["data.dataset"] == "tiny"

    latest = server.model_version(MODEL, "challenger") if not promoted else champion
    assert latest["tags"]["model.sha256"] == atomic.sha256_file(pipelines.repo / "models" / "vae.pt")


def _doc_snippet() -> str:
    """The python block of docs/mlflow.md that loads the champion."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "mlflow.md").read_text(), re.S)
    return next(b for b in blocks if "models:/vae-mnist@champion" in b)


def test_the_documented_snippet_loads_the_champion_from_the_server(pipelines, tmp_path):
    check = "\nimport json\nprint(json.dumps([recon.shape, mu.shape, log_std.shape]))\n"
    proc = subprocess.run(
        [sys.executable, "-c", _doc_snippet() + check], cwd=tmp_path, env=pipelines.env,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    champion = pipelines.server.model_version(MODEL, "champion")
    champion_run = next(r for r in pipelines.runs if r["info"]["run_id"] == champion["run_id"])
    latent_dim = int(champion_run["data"]["params"]["model.latent_dim"])
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [[8, 784], [8, latent_dim], [8, latent_dim]]
