"""params.yaml loads into typed, frozen objects; every problem is reported at once."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest
import torch

from tests.support.project import ROOT, tiny_raw_params
from vae_mlops.errors import VaeMlopsError
from vae_mlops.metric_catalogue import CATALOGUE, GATE_METRICS
from vae_mlops.params import ParamsError, load_params, parse_params, parse_set_args


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


def test_unknown_missing_and_malformed_sections_are_listed_together(tiny_mirror):
    raw = tiny_raw_params()
    raw["colour"] = {"hue": 1}
    raw["mlflow"] = ["vae-mnist"]
    del raw["evaluate"]
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    problems = err.value.problems
    assert any(p.startswith("colour: unknown section (known: data, model, train,") for p in problems), problems
    assert "mlflow: must be a mapping, got list" in problems and "evaluate: missing section" in problems
    assert len(problems) == 3


def test_unknown_key_names_the_known_keys(tiny_mirror):
    known = "hidden_dim, latent_dim, likelihood, arch, hidden_dims, prior, n_components"
    with pytest.raises(ParamsError, match=rf"model\.depth: unknown key \(known: {known}\)"):
        parse_params(tiny_raw_params(**{"model.depth": 3}))


@pytest.mark.parametrize(
    ("metric", "needle"),
    [("test.loss", "register.metric: must be one of test.elbo, test.nll_iwae"),
     ("test.kl", "register.metric: 'test.kl' has no better direction")],
)  # fmt: skip
def test_a_metric_that_cannot_drive_the_gate_is_refused_before_any_work(tiny_mirror, metric, needle):
    with pytest.raises(ParamsError, match=re.escape(needle)):
        parse_params(tiny_raw_params(**{"register.metric": metric}))


def test_every_metric_with_a_direction_can_drive_the_gate(tiny_mirror):
    for key in GATE_METRICS:
        mixture = {"model.prior": "gmm"} if CATALOGUE[key].mixture_only else {}  # only a mixture has its own clusters
        assert parse_params(tiny_raw_params(**{"register.metric": key, **mixture})).register.metric == key


def test_ints_are_stored_as_floats_and_strings_are_not_numbers(tiny_mirror):
    params = parse_params(tiny_raw_params(**{"train.lr": 1, "train.beta": 0}))
    assert type(params.train.lr) is float and params.train.lr == 1.0 and type(params.train.beta) is float
    with pytest.raises(ParamsError) as err:
        parse_params(tiny_raw_params(**{"train.epochs": "3", "train.fused": "yes", "mlflow.experiment": 7}))
    assert sorted(err.value.problems) == [
        "mlflow.experiment: expected str, got int (7)",
        "train.epochs: expected int, got str ('3')",
        "train.fused: expected bool, got str ('yes')",
    ]


def test_bounds_and_rules_say_what_was_given(tiny_mirror):
    with pytest.raises(ParamsError) as err:
        parse_params(tiny_raw_params(**{"evaluate.n_clusters": 1, "train.seed": -1, "orchestrate.retrain_cron": "daily",
                                        "register.model_name": "  "}))  # fmt: skip
    assert sorted(err.value.problems) == [
        "evaluate.n_clusters: must be >= 2, got 1",
        "orchestrate.retrain_cron: must be a 5-field cron expression, got 'daily'",
        "register.model_name: must not be empty, got '  '",
        "train.seed: must be >= 0, got -1",
    ]


def test_params_round_trip_through_their_dict_and_are_hashable(tiny_mirror):
    params = parse_params(tiny_raw_params())
    assert parse_params(params.to_dict()) == params and hash(parse_params(params.to_dict())) == hash(params)
    assert params.flat()["train.epochs"] == params.train.epochs


def test_a_params_error_is_a_known_fault():
    assert issubclass(ParamsError, VaeMlopsError)


def test_set_args_are_yaml_values_and_a_pair_without_equals_is_refused():
    assert parse_set_args(["train.epochs=3", "train.lr=0.001", "orchestrate.gpu_pool=", "train.fused=false"]) == {
        "train.epochs": 3, "train.lr": 1e-3, "orchestrate.gpu_pool": None, "train.fused": False,
    }  # fmt: skip
    with pytest.raises(ParamsError, match="-S train.epochs: expected KEY=VALUE"):
        parse_set_args(["train.epochs"])


def test_a_section_built_in_code_is_validated_but_asks_nothing_of_this_machine():
    from pydantic import ValidationError

    from vae_mlops.params import DataParams, TrainParams

    assert DataParams("not-registered-here", 2, 1, [], 0.2, 0.2, "none").timeout_s == 2.0  # the dataset is checked on load
    with pytest.raises(ValidationError):
        DataParams("mnist", 0.0, 1, [], 0.2, 0.2, "none")
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainParams(**{**load_params(ROOT / "params.yaml").train.__dict__}).epochs = 1  # type: ignore[misc]
