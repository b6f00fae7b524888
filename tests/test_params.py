"""params.yaml loads into typed, frozen objects; every problem is reported at once."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, tiny_raw_params
from vae_mlops.params import ParamsError, load_params, parse_params


def test_repo_params_yaml_is_valid_and_frozen():
    params = load_params(ROOT / "params.yaml")
    assert params.model.likelihood in ("bernoulli", "gaussian")
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.train.epochs = 3  # type: ignore[misc]


def test_flat_names_match_dvc_exp_set_syntax():
    flat = load_params(ROOT / "params.yaml").flat()
    assert "model.latent_dim" in flat and "train.lr" in flat


def test_every_problem_is_listed_in_one_error(tiny_mirror):
    raw = tiny_raw_params(**{"train.epochs": 0, "train.lr": "fast", "model.hidden_dim": -3, "train.colour": 1})
    raw["model"]["likelihood"] = "poisson"
    del raw["train"]["seed"]
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    text = str(err.value)
    for needle in ["train.epochs: must be > 0", "train.lr: expected float", "model.hidden_dim: must be > 0",
                   "train.colour: unknown key", "model.likelihood: must be one of", "train.seed: missing"]:
        assert needle in text, needle
    assert len(err.value.problems) == 6


def test_unknown_dataset_and_device_are_rejected(tiny_mirror):
    with pytest.raises(ParamsError) as err:
        parse_params(tiny_raw_params(**{"data.dataset": "cifar", "train.device": "tpu"}))
    assert "data.dataset: must be one of" in str(err.value) and "train.device: must be one of" in str(err.value)


def test_bool_is_not_accepted_as_int(tiny_mirror):
    with pytest.raises(ParamsError, match="train.batch_size: expected int"):
        parse_params(tiny_raw_params(**{"train.batch_size": True}))


def test_cli_reports_bad_override_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "vae_mlops", "train", "-S", "train.batch_size=0", "-S", "model.nope=1"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert "train.batch_size: must be > 0" in proc.stderr and "model.nope: unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_cuda_without_a_gpu_is_listed_with_the_other_problems(tiny_mirror):
    with pytest.raises(ParamsError) as err:
        parse_params(tiny_raw_params(**{"train.device": "cuda", "train.batch_size": 0}))
    assert "train.device: is 'cuda' but no CUDA GPU" in str(err.value)
    assert "train.batch_size: must be > 0" in str(err.value) and len(err.value.problems) == 2
