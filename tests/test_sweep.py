"""`make sweep`: a grid queued with `dvc exp run --queue`, run to completion, landing in the workspace's store."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from pipeline import sweep
from tests.support.e2e import copy_project, dvc, run, tool_env
from vae_mlops import registry, tracking
from vae_mlops.params import ParamsError
from vae_mlops.paths import Paths


def test_the_grid_is_the_product_of_its_axes_and_the_default_has_six_points():
    points = sweep.parse_grid(["model.latent_dim=2,10", "model.likelihood=bernoulli,gaussian"])
    assert [str(p) for p in points] == [
        "model.latent_dim=2 model.likelihood=bernoulli", "model.latent_dim=2 model.likelihood=gaussian",
        "model.latent_dim=10 model.likelihood=bernoulli", "model.latent_dim=10 model.likelihood=gaussian",
    ]  # fmt: skip
    assert points[0].overrides == {"model.latent_dim": 2, "model.likelihood": "bernoulli"}
    default = sweep.parse_grid(list(sweep.DEFAULT_GRID))
    assert len(default) == 6 and {p.overrides["model.latent_dim"] for p in default} == {2, 10, 20}


def test_the_grid_goes_to_dvc_in_its_own_syntax_one_axis_each_value_once():
    points = sweep.parse_grid(["model.latent_dim=2, 10,2", "model.likelihood=bernoulli"])
    assert sweep.grid_axes(points) == ["model.latent_dim=2,10", "model.likelihood=bernoulli"]


def test_a_malformed_grid_names_every_bad_axis():
    with pytest.raises(sweep.SweepError) as err:
        sweep.parse_grid(["model.latent_dim", "train.lr=0.1,,0.2", "train.epochs=1", "train.epochs=2"])
    msg = str(err.value)
    assert "'model.latent_dim': expected KEY=V1,V2" in msg and "'train.lr=0.1,,0.2': an empty value" in msg
    assert "train.epochs: given twice" in msg


def test_bad_values_are_one_error_before_anything_is_queued(tmp_path, monkeypatch, capsys):
    repo = copy_project(tmp_path / "repo")
    queued = []
    monkeypatch.setattr(sweep, "queue_grid", lambda *a: queued.append(a) or {})
    with pytest.raises(ParamsError) as err:
        sweep.sweep(repo, ["model.latent_dim=0,2", "model.likelihood=poisson"], 1, None)
    assert "model.latent_dim=0 model.likelihood=poisson: model.latent_dim: must be > 0" in str(err.value)
    assert "model.latent_dim=2 model.likelihood=poisson: model.likelihood: must be one of" in str(err.value)
    assert queued == []
    assert sweep.main(["--root", str(repo), "model.likelihood=poisson"]) == 2
    assert "model.likelihood" in capsys.readouterr().err


# ---------------------------------------------------------------- the real queue


def _experiments(show: list) -> dict[str, dict]:
    """`dvc exp show --json` -> {experiment name: its metrics (reports/metrics.json)}."""
    found: dict[str, dict] = {}

    def walk(node) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            data, name = node.get("data"), node.get("name")
            if name and isinstance(data, dict) and "rev" in node and data.get("metrics"):
                metrics = data["metrics"].get("reports/metrics.json", {}).get("data")
                if metrics:
                    found[name] = metrics
            for key in ("experiments", "revs"):
                walk(node.get(key))

    walk(show)
    return found


@pytest.fixture
def workspace(data_env, tmp_path, monkeypatch) -> Path:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the workspace's own sqlite store
    repo = copy_project(tmp_path / "workspace", **{"train.epochs": 1})
    return repo


def _sweep(repo: Path, *axes: str, check: bool = True):
    cmd = [sys.executable, "-m", "pipeline.sweep", *axes]
    return run(cmd, repo, tool_env(DVC_NO_ANALYTICS="1"), check=check, timeout=1500)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # two experiments through DVC's queue, on a busy 2-core machine
def test_a_queued_sweep_logs_and_registers_into_the_workspace_store_named_after_its_experiments(workspace):
    out = _sweep(workspace, "model.latent_dim=2,3", "model.likelihood=bernoulli")
    names = dict(line.split(": ", 1) for line in out.stdout.strip().splitlines())
    assert sorted(names.values()) == [f"model.latent_dim={z} model.likelihood=bernoulli" for z in (2, 3)]

    # the stages ran in DVC's temporary copies, which are gone; the runs are in the workspace's store
    assert not list((workspace / ".dvc" / "tmp" / "exps").glob("tmp*/mlflow.db"))
    uri = tracking.tracking_uri(Paths(workspace))
    assert uri == f"sqlite:///{(workspace / 'mlflow.db').resolve()}"
    client = tracking.mlflow_client(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = {r.data.tags.get(tracking.TAG_DVC_EXPERIMENT): r for r in client.search_runs(experiments)}
    assert set(runs) == set(names)
    shown = _experiments(json.loads(dvc("exp", "show", "--json", cwd=workspace).stdout))
    for name, point in names.items():
        r = runs[name]
        assert r.info.run_name == name and r.info.status == "FINISHED"
        assert f"model.latent_dim={r.data.params['model.latent_dim']}" in point
        assert f"DVC experiment `{name}`" in r.data.tags[tracking.TAG_DESCRIPTION]
        # `dvc exp show` and the MLflow UI show the same numbers for the same experiment
        assert shown[name] and {k: r.data.metrics[k] for k in shown[name]} == pytest.approx(shown[name], rel=1e-6)
        assert Path(r.info.artifact_uri.removeprefix("file://")).is_relative_to(workspace / "mlartifacts")

    # both registrations went through the workspace's gate, and `make history` (registry tags) shows both
    reg = tracking.ModelRegistry("vae-mnist", uri)
    decided = registry.registry_history(reg)
    assert sorted(d["run_id"] for d in decided) == sorted(r.info.run_id for r in runs.values())
    assert (workspace / "mlflow.db.register.lock").exists()
    history = run([sys.executable, "-m", "vae_mlops", "registry", "history", "--registry"], workspace)
    assert "v1" in history.stdout and "v2" in history.stdout


@pytest.mark.slow
def test_a_sweep_with_a_failed_experiment_exits_non_zero_and_names_it(workspace):
    # valid params, but the tiny mirror has no fashion-mnist and the tests are offline: download fails
    out = _sweep(workspace, "data.dataset=fashion-mnist", check=False)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "1 of 1 experiments of the sweep did not succeed" in out.stderr and "dvc queue logs" in out.stderr
