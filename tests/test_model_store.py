"""The weights-only model format: round trip, the safe pyfunc loader, and planted pickles that are never run."""

from __future__ import annotations

import contextlib
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.support.e2e import copy_project, dvc, tool_env
from tests.support.mlflow_store import fresh_store
from tests.support.planted import Planted, plant_pickle
from vae_mlops import model_store, pyfunc, registry, tracking
from vae_mlops.model import VAE, VAEConfig, elbo
from vae_mlops.params import RegisterParams

METRIC = "test.nll_iwae"


def _vae(seed: int = 0, likelihood: str = "bernoulli") -> VAE:
    torch.manual_seed(seed)
    return VAE(VAEConfig(784, 16, 3, likelihood)).eval()


def _images(n: int = 4) -> np.ndarray:
    return np.random.default_rng(0).random((n, 784), dtype=np.float32)


def _candidate(value: float, seed: int = 0, data_hash: str = "hash-1") -> registry.Candidate:
    return registry.Candidate(
        model=_vae(seed),
        metrics={METRIC: value},
        dataset="tiny",
        data_hash=data_hash,
        git_commit="0123456789abcdef",
        model_sha256=f"sha-{value}-{seed}",
        input_example=_images(2),
    )


@pytest.fixture
def store(tmp_path) -> tracking.PipelineRun:
    """A fresh sqlite store with one pipeline run to log into."""
    uri = fresh_store(tmp_path / "store")
    client = tracking.mlflow_client(uri)
    run_id = client.create_run(tracking.ensure_experiment(client, "model-store-tests", uri)).info.run_id
    return tracking.PipelineRun(run_id, "1", uri)


def _no_rescore(vae) -> float:
    raise AssertionError("no re-scoring expected")


# ---------------------------------------------------------------- the format


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_log_then_load_gives_the_same_tensors_and_config(store, likelihood):
    vae = _vae(1, likelihood)
    uri = model_store.log_vae(store, vae, _images(2), {"k": "v"})
    back = model_store.load_vae(uri, store.uri)
    assert back.config == vae.config
    want, got = vae.state_dict(), back.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert model_store.run_model_uri(store.run_id, store.uri) == uri


def test_test_metrics_are_linked_to_the_logged_model(store):
    uri = model_store.log_vae(store, _vae(), _images(2), {}, {METRIC: 91.5, "test.elbo": -95.0})
    logged = tracking.mlflow_client(store.uri).get_logged_model(uri.removeprefix("models:/"))
    assert {m.key: m.value for m in logged.metrics} == {METRIC: 91.5, "test.elbo": -95.0}
    assert all(m.run_id == store.run_id for m in logged.metrics)


def test_the_champion_loads_safely_as_a_pyfunc_and_names_its_version(store, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    cand = _candidate(100.0, seed=2)
    registry.register(store, cand, RegisterParams("pyfunc", METRIC, 0.0), tmp_path / "log.jsonl", _no_rescore)
    model = model_store.load_pyfunc("models:/pyfunc@champion", store.uri)
    assert model.predict(_images(1))["version"] == "1"
    x = _images(5)
    xt = torch.from_numpy(x)
    with torch.no_grad():
        mu, log_std = cand.model.encode(xt)
        want = {
            "reconstruction": cand.model.decode(mu),
            "mu": mu,
            "log_std": log_std,
            "elbo": elbo(cand.model, xt, eps=pyfunc.elbo_noise(3)),
        }
    for output, expected in want.items():
        got = model.predict(x, params={"output": output})
        assert got["output"] == output
        np.testing.assert_allclose(got["values"], expected.numpy(), rtol=1e-5, atol=1e-5)
    assert model.predict(x)["output"] == "reconstruction"
    # the same model logged as a pickle would not load at all with this setting
    with pytest.raises(Exception, match="pickle"):
        with tracking.use_store(store.uri):
            mlflow.pyfunc.load_model(plant_pickle(store, tmp_path / "unused-marker"))


# ---------------------------------------------------------------- planted pickles


def _make_champion(run: tracking.PipelineRun, name: str, model_uri: str, cand: registry.Candidate) -> None:
    """Register `model_uri` with `cand`'s tags and make it champion, as an attacker with registry rights could."""
    reg = tracking.ModelRegistry(name, run.uri)
    version = reg.create_version(model_uri, run.run_id, registry.version_tags(cand))
    reg.set_alias(registry.CHAMPION, version.version)


def test_a_planted_pickle_champion_is_refused_before_comparing_and_never_unpickled(store, tmp_path):
    marker = tmp_path / "pwned"
    old = _candidate(100.0)
    _make_champion(store, "planted", plant_pickle(store, marker), old)  # same data: no re-score needed
    refused = r"refuses to compare with champion v1 of planted.*not a VAE logged by this pipeline"
    with pytest.raises(model_store.UnsafeModelError, match=refused):
        registry.register(store, _candidate(50.0, seed=1), RegisterParams("planted", METRIC, 0.0),
                          tmp_path / "log.jsonl", _no_rescore)  # fmt: skip
    assert not marker.exists()
    reg = tracking.ModelRegistry("planted", store.uri)
    assert [v.version for v in reg.versions()] == ["1"]  # refused before a version was made
    assert reg.aliases() == {registry.CHAMPION: "1"}
    assert not (tmp_path / "log.jsonl").exists()

    # the plant is real: MLflow's own pickle loader runs it
    import mlflow.pytorch

    with tracking.use_store(store.uri), contextlib.suppress(Exception):
        mlflow.pytorch.load_model("models:/planted/1")
    assert marker.exists()


def test_weights_that_are_a_pickle_are_refused_without_unpickling(store, tmp_path):
    """A version that looks like this format but whose weights file is a pickle: `weights_only` refuses it."""
    marker = tmp_path / "pwned"
    uri = model_store.log_vae(store, _vae(), _images(2), {})
    root = model_store._artifact_root(uri, store.uri)
    weights = Path(root.removeprefix("file://")) / "data" / model_store.DATA_DIR / model_store.WEIGHTS_FILE
    weights.write_bytes(pickle.dumps(Planted(marker)))
    _make_champion(store, "forged", uri, _candidate(100.0, data_hash="old-data"))  # other data: re-score loads it
    with pytest.raises(model_store.UnsafeModelError, match="not a plain tensor state_dict"):
        registry.register(store, _candidate(50.0, seed=1), RegisterParams("forged", METRIC, 0.0),
                          tmp_path / "log.jsonl", lambda vae: 1.0)  # fmt: skip
    assert not marker.exists()


def test_load_vae_refuses_weights_that_do_not_fit_the_config(store, tmp_path):
    uri = model_store.log_vae(store, _vae(), _images(2), {})
    root = Path(model_store._artifact_root(uri, store.uri).removeprefix("file://"))
    config = root / "data" / model_store.DATA_DIR / model_store.CONFIG_FILE
    config.write_text(json.dumps({**json.loads(config.read_text()), "latent_dim": 5}))
    with pytest.raises(model_store.UnsafeModelError, match="do not fit its config"):
        model_store.load_vae(uri, store.uri)


# ---------------------------------------------------------------- through the CLI


@pytest.mark.slow
def test_register_stage_exits_2_on_a_planted_champion_and_the_marker_never_appears(data_env, tmp_path, monkeypatch):
    monkeypatch.setenv("VAE_DATA_MIRROR", f"file://{data_env}")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    repo = copy_project(tmp_path / "repo", **{"train.epochs": 1})
    uri = fresh_store(repo)
    dvc("repro", "evaluate", cwd=repo)
    marker = tmp_path / "pwned"
    run_id = json.loads((repo / "reports" / "mlflow_run.json").read_text())["run_id"]
    run = tracking.PipelineRun(run_id, "1", uri)
    _make_champion(run, "vae-mnist", plant_pickle(run, marker), _candidate(1.0))

    proc = subprocess.run([sys.executable, "-m", "vae_mlops", "register"], cwd=repo, env=tool_env(),
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "refuses to compare with champion v1 of vae-mnist" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()
    assert not (repo / "reports" / "registration.json").exists()
