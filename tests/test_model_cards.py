"""Model cards: every registered version and the registered model carry a description the MLflow UI shows."""

from __future__ import annotations

import math
import re
import subprocess
from pathlib import Path

import pytest

from tests.support.browser import CHROMIUM, CHROMIUM_FLAGS
from tests.support.candidates import DATA_HASH, GIT_COMMIT, METRIC, NAME, candidate
from tests.support.mlflow_store import fresh_store, mlflow_server
from vae_mlops import registry, tracking
from vae_mlops.metric_catalogue import CATALOGUE
from vae_mlops.params import RegisterParams


@pytest.fixture()
def registered(tmp_path) -> tuple[Path, str, list[registry.Decision]]:
    """A sqlite store under `tmp_path` with v1 (champion) and v2 (not promoted), both through `register`."""
    uri = fresh_store(tmp_path)
    client = tracking.mlflow_client(uri)
    exp = tracking.ensure_experiment(client, "cards", uri)
    decisions = []
    for value in (100.0, 101.0):
        run = tracking.PipelineRun(client.create_run(exp).info.run_id, exp, uri)
        client.log_param(run.run_id, "model.latent_dim", "2")
        client.log_param(run.run_id, "train.lr", "0.001")
        decisions.append(
            registry.register(run, candidate(value, int(value), {"test.kl": 3.0}), RegisterParams(NAME, METRIC, 0.0),
                              tmp_path / "promotions.jsonl", lambda vae: math.nan)  # fmt: skip
        )
    return tmp_path, uri, decisions


def test_every_version_card_holds_metrics_with_meaning_data_params_decision_commit_and_links(registered):
    _, uri, decisions = registered
    client = tracking.ModelRegistry(NAME, uri).client
    for d in decisions:
        card = client.get_model_version(NAME, d.version).description
        assert d.reason in card and d.decision in card
        assert CATALOGUE[METRIC].meaning in card and CATALOGUE["test.kl"].meaning in card
        assert "`tiny`" in card and DATA_HASH in card and GIT_COMMIT in card
        assert "| `model.latent_dim` | `2` |" in card and "| `train.lr` | `0.001` |" in card
        assert f"runs/{d.run_id})" in card and f"runs/{d.run_id}/artifactPath/compare/compare.html" in card
    model_card = client.get_registered_model(NAME).description
    assert "variational autoencoder" in model_card and "load_pyfunc" in model_card
    assert "from vae_mlops.model_store import load_pyfunc" in model_card and "make rollback" in model_card


def _dom(url: str, profile: Path) -> str:
    cmd = [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=30000",
           "--dump-dom", url]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180).stdout


@pytest.mark.slow
def test_the_mlflow_ui_shows_the_cards(registered):
    if not CHROMIUM.exists():
        pytest.fail("Chromium is not installed: `make test` installs Debian's chromium")
    folder, _, decisions = registered
    with mlflow_server(folder) as server:
        model_page = _dom(f"{server.url}/#/models/{NAME}", folder / "profile-1")
        version_page = _dom(f"{server.url}/#/models/{NAME}/versions/1", folder / "profile-2")
    text = re.sub(r"<[^>]+>", " ", model_page)
    assert "variational autoencoder" in text and "load_pyfunc" in text, model_page[-3000:]
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", version_page))
    assert decisions[0].reason in text, version_page[-3000:]
    assert "importance-weighted estimate" in text  # the metric's meaning, rendered from the card's table
