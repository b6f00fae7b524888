"""Shared fixtures: a tiny synthetic dataset served from a local mirror, and small params."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

from synthetic import make_dataset, register  # noqa: E402

# No test may reach outside this machine.
os.environ["VAE_OFFLINE"] = "1"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"

TINY_OVERRIDES = {
    "data.dataset": "tiny",
    "model.hidden_dim": 64,
    "model.latent_dim": 4,
    "train.epochs": 2,
    "train.batch_size": 64,
    "train.val_size": 100,
    "train.image_every": 1,
    "train.device": "cpu",
    "evaluate.iwae_samples": 8,
    "evaluate.batch_size": 100,
}


@pytest.fixture(scope="session")
def tiny_mirror(tmp_path_factory) -> Path:
    """A folder holding the tiny dataset's four gzipped IDX files; registered as dataset `tiny`."""
    base = tmp_path_factory.mktemp("tiny-data")
    specs = make_dataset(base / "mirror", "tiny")
    os.environ["VAE_EXTRA_DATASETS"] = str(register(specs, base / "datasets.yaml"))
    return base / "mirror"


@pytest.fixture
def data_env(tiny_mirror, monkeypatch) -> Path:
    monkeypatch.setenv("VAE_DATA_MIRROR", str(tiny_mirror))
    return tiny_mirror


def tiny_raw_params(**extra) -> dict:
    """The repo's params.yaml with the tiny overrides (and `extra`, dotted keys) applied."""
    from vae_mlops.params import apply_overrides

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    return apply_overrides(raw, {**TINY_OVERRIDES, **extra})


@pytest.fixture
def tiny_params(tiny_mirror):
    from vae_mlops.params import parse_params

    return parse_params(tiny_raw_params())
