"""Rolling the champion back keeps the record: the gate's checks first, then the history, the tag and the card."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from tests.support.candidates import METRIC, NAME, candidate
from tests.support.mlflow_store import fresh_store
from vae_mlops import cli, model_store, registry, tracking
from vae_mlops.params import RegisterParams


@pytest.fixture()
def project(tmp_path) -> tuple[Path, str]:
    """A project folder whose store holds v1 (champion, 100) and v2 (promoted over it, 95), both through `register`."""
    uri = fresh_store(tmp_path)
    client = tracking.mlflow_client(uri)
    exp = tracking.ensure_experiment(client, "rollback-tests", uri)
    (tmp_path / "reports").mkdir()
    log = tmp_path / "reports" / "promotions.jsonl"
    for value, seed in ((100.0, 0), (95.0, 1)):
        run = tracking.PipelineRun(client.create_run(exp).info.run_id, exp, uri)
        client.log_param(run.run_id, "model.latent_dim", "2")
        registry.register(run, candidate(value, seed, {"test.recon_mse": value / 1000}), RegisterParams(NAME, METRIC, 0.0), log, lambda vae: math.nan)
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["register"].update(model_name=NAME, metric=METRIC)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path, uri


def _rollback(root: Path, *args: str) -> int:
    return cli.main(["registry", "rollback", *args, "--root", str(root), "--params", str(root / "params.yaml")])


def test_rollback_moves_the_champion_and_keeps_the_record(project, monkeypatch, capsys):
    root, uri = project
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    reg = tracking.ModelRegistry(NAME, uri)
    assert reg.aliases()["champion"] == "2"

    assert _rollback(root, "1", "--reason", "v2 blurs the digits") == 0
    assert reg.aliases()["champion"] == "1"
    logged = registry.read_log(root / "reports" / "promotions.jsonl")
    assert [(r["version"], r["decision"]) for r in logged] == [
        ("1", "promoted"), ("2", "promoted"), ("1", "rolled back"),
    ]  # fmt: skip
    last = logged[-1]
    assert last["champion_version"] == "2" and last["value"] == 100.0 and last["champion_value"] == 95.0
    assert "v2 blurs the digits" in last["reason"] and last["alias"] == "champion"
    tagged = registry.registry_history(reg)
    assert tagged[-1] == last  # the registry's own history shows it, with the gate's decisions intact
    assert json.loads(reg.version("1").tags[registry.TAG_PROMOTION])["decision"] == "promoted"
    assert "rollback" in reg.client.get_model_version(NAME, "1").description.lower()

    capsys.readouterr()
    assert cli.main(["registry", "history", "--root", str(root)]) == 0
    assert "rolled back" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, problem",
    [
        (["7", "--reason", "x"], "no version '7'"),
        (["2", "--reason", "x"], "champion already"),
        (["1"], "needs a reason"),
        (["1", "--reason", "  "], "needs a reason"),
    ],
)
def test_a_bad_rollback_says_why_and_changes_nothing(project, monkeypatch, capsys, args, problem):
    root, uri = project
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    before = (root / "reports" / "promotions.jsonl").read_text()
    assert _rollback(root, *args) == 2
    assert problem in capsys.readouterr().err
    assert tracking.ModelRegistry(NAME, uri).aliases()["champion"] == "2"
    assert (root / "reports" / "promotions.jsonl").read_text() == before


def test_rollback_refuses_a_version_the_gate_would_refuse(project, monkeypatch, capsys):
    """A version whose MLmodel is not the weights-only format (here: a planted pickled flavour) is never champion."""
    root, uri = project
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    reg = tracking.ModelRegistry(NAME, uri)
    source = reg.client.get_model_version_download_uri(NAME, "1")
    mlmodel = Path(source.removeprefix("file://")) / "MLmodel"
    if not mlmodel.is_file():
        pytest.skip(f"the version's artifacts are not a local folder here ({source})")
    text = yaml.safe_load(mlmodel.read_text())
    text["flavors"]["pytorch"] = {"pickle_module_name": "cloudpickle"}
    mlmodel.write_text(yaml.safe_dump(text))
    assert _rollback(root, "1", "--reason", "x") == 2
    assert "refusing to roll back to v1" in capsys.readouterr().err
    assert reg.aliases()["champion"] == "2"


def test_a_version_registered_outside_the_gate_is_refused(project, monkeypatch, capsys):
    root, uri = project
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    reg = tracking.ModelRegistry(NAME, uri)
    by_hand = reg.create_version(f"models:/{NAME}/1", reg.version("1").run_id, {})
    assert _rollback(root, by_hand.version, "--reason", "x") == 2
    assert "not registered by this pipeline" in capsys.readouterr().err


def test_the_gates_refusal_names_the_rollback_command(project):
    root, uri = project
    reg = tracking.ModelRegistry(NAME, uri)
    source = reg.client.get_model_version_download_uri(NAME, "2")
    mlmodel = Path(source.removeprefix("file://")) / "MLmodel"
    if not mlmodel.is_file():
        pytest.skip(f"the version's artifacts are not a local folder here ({source})")
    for planted in ("flavors: {pytorch: {}}\n", "[not, a, mapping\n"):
        mlmodel.write_text(planted)
        with pytest.raises(model_store.UnsafeModelError, match="make rollback VERSION="):
            registry.check_champion(reg, "2")
