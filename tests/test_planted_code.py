"""Nothing a shared store holds is executed: versions whose MLmodel or files carry code are refused everywhere.

Each plant (tests/support/planted.py) tampers with a genuine version as anyone with write access to the
artifact store could, and writes a marker file when MLflow's own loader follows it. Every entry point this
project has (the gate, the safe loader, `make serve-model`'s preparation, the loader the pipeline uses for
re-scoring and comparison) refuses it with a message naming the difference, and the marker never appears.
"""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.support.e2e import tool_env
from tests.support.mlflow_store import fresh_store
from tests.support.planted import PLANTS, plant_code
from vae_mlops import model_store, registry, serving, tracking
from vae_mlops.model import VAE, VAEConfig
from vae_mlops.params import RegisterParams
from vae_mlops.paths import Paths

METRIC = "test.nll_iwae"
NAME = "planted"
WHAT_IS_NAMED = {
    "code-on-path": "it ships code ('code')",
    "own-loader": "loader_module is 'planted_loader'",
    "models-from-code": "loader_module is 'mlflow.pyfunc.model'",
    "extra-code-folder": "unexpected folder 'code'",
}


def _candidate(value: float, seed: int, data_hash: str = "hash-1") -> registry.Candidate:
    torch.manual_seed(seed)
    return registry.Candidate(
        model=VAE(VAEConfig(784, 16, 3, "bernoulli")).eval(),
        metrics={METRIC: value},
        dataset="tiny",
        data_hash=data_hash,
        git_commit="0123456789abcdef",
        model_sha256=f"sha-{value}-{seed}",
        input_example=np.random.default_rng(0).random((2, 784), dtype=np.float32),
    )


@pytest.fixture
def planted(tmp_path, request):
    """A store whose champion v1 was logged by this pipeline, then tampered with; yields (run, marker, how)."""
    uri = fresh_store(tmp_path / "store")
    client = tracking.mlflow_client(uri)
    run = tracking.PipelineRun(client.create_run(tracking.ensure_experiment(client, "planted", uri)).info.run_id, "1", uri)
    decision = registry.register(run, _candidate(100.0, 0), RegisterParams(NAME, METRIC, 0.0), tmp_path / "log.jsonl",
                                 lambda vae: 0.0)  # fmt: skip
    assert (decision.version, decision.alias) == ("1", "champion")
    marker = tmp_path / "pwned"
    plant_code(f"models:/{NAME}/1", uri, marker, request.param)
    return run, marker, request.param


@pytest.mark.parametrize("planted", PLANTS, indirect=True)
def test_the_format_check_names_each_plant(planted):
    run, marker, how = planted
    with pytest.raises(model_store.UnsafeModelError, match="not a VAE logged by this pipeline") as err:
        model_store.verify(f"models:/{NAME}@champion", run.uri)
    assert WHAT_IS_NAMED[how] in str(err.value) and "make rollback" in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("planted", PLANTS, indirect=True)
def test_the_gate_refuses_a_planted_champion_before_comparing(planted, tmp_path):
    run, marker, how = planted
    with pytest.raises(model_store.UnsafeModelError, match=f"refuses to compare with champion v1 of {NAME}"):
        registry.register(run, _candidate(50.0, 1, data_hash="new-data"), RegisterParams(NAME, METRIC, 0.0),
                          tmp_path / "log2.jsonl", lambda vae: 1.0)  # fmt: skip
    assert tracking.ModelRegistry(NAME, run.uri).aliases() == {registry.CHAMPION: "1"}
    assert not marker.exists()


@pytest.mark.parametrize("planted", PLANTS, indirect=True)
@pytest.mark.parametrize("entry", ["load_pyfunc", "load_vae", "serve-model"])
def test_loaders_and_serve_model_refuse_a_planted_version(planted, entry, tmp_path):
    run, marker, how = planted
    with pytest.raises(model_store.UnsafeModelError, match=re.escape(WHAT_IS_NAMED[how])):
        if entry == "load_pyfunc":
            model_store.load_pyfunc(f"models:/{NAME}@champion", run.uri)
        elif entry == "load_vae":  # what the gate's re-score, compare and the serving follower call
            model_store.load_vae(f"models:/{NAME}/1", run.uri)
        else:
            serving.prepare(NAME, "champion", run.uri, Paths(tmp_path / "checkout"))
    assert not marker.exists()
    assert not (tmp_path / "checkout" / ".serving" / f"{NAME}@champion").exists()


@pytest.mark.parametrize("planted", ["code-on-path", "own-loader", "models-from-code"], indirect=True)
def test_each_plant_is_real_mlflows_own_loader_runs_it(planted):
    """Without the check the marker appears: MLflow's loader, in a fresh process as a server starts, follows it."""
    run, marker, _ = planted
    code = f"import mlflow; mlflow.pyfunc.load_model('models:/{NAME}@champion')"
    subprocess.run([sys.executable, "-c", code], env=tool_env(MLFLOW_TRACKING_URI=run.uri), capture_output=True,
                   timeout=300)  # fmt: skip
    assert marker.exists()
