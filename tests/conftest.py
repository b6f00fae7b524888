"""Shared fixtures: a tiny synthetic dataset served from a local mirror, and small params."""

from __future__ import annotations

import collections
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.project import tiny_raw_params
from tests.support.synthetic import make_dataset, register

# No test may reach outside this machine.
os.environ["VAE_OFFLINE"] = "1"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one xdist worker per core. Each worker, and every stage it starts (the variable
    # is inherited), computes on one thread: two workers' OpenMP teams on two cores spin against each
    # other and every step slows tenfold.
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with the most slow (end-to-end) tests first, each file's own order kept.

    `make test` hands whole files to its xdist workers in this order: a long file handed out
    last would run alone while the other workers sit idle.
    """
    slow = collections.Counter(item.path for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.path])


@pytest.fixture(scope="session")
def tiny_mirror(tmp_path_factory) -> Iterator[Path]:
    """A folder holding the tiny dataset's four gzipped IDX files; registered as dataset `tiny`.

    The registration (`VAE_EXTRA_DATASETS`) is undone when the session ends. A test that uses the
    dataset `tiny` asks for this fixture (or `tiny_params`, `data_env`): run alone, it fails otherwise.
    """
    base = tmp_path_factory.mktemp("tiny-data")
    specs = make_dataset(base / "mirror", "tiny")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VAE_EXTRA_DATASETS", str(register(specs, base / "datasets.yaml")))
        yield base / "mirror"


@pytest.fixture
def data_env(tiny_mirror, monkeypatch) -> Path:
    monkeypatch.setenv("VAE_DATA_MIRROR", str(tiny_mirror))
    return tiny_mirror


@pytest.fixture
def tiny_params(tiny_mirror):
    from vae_mlops.params import parse_params

    return parse_params(tiny_raw_params())
