"""Binarised MNIST (`data.binarize`): fresh Bernoulli draws per training epoch, one fixed draw for held-out data."""

from __future__ import annotations

import pytest
import torch

from tests.support.project import tiny_raw_params
from vae_mlops import binarize
from vae_mlops.params import ParamsError, parse_params
from vae_mlops.paths import Paths
from vae_mlops.stage_inputs import load_test_split, load_train_data
from vae_mlops.stages.download import download as run_download
from vae_mlops.stages.train import build_state
from vae_mlops.train import train_epoch

GREY = torch.rand(500, 784, generator=torch.Generator().manual_seed(0))


def is_binary(x: torch.Tensor) -> bool:
    return bool(((x == 0) | (x == 1)).all())


def test_none_leaves_the_grey_values_untouched():
    assert binarize.epoch_images(GREY, "none", 1, 1) is GREY
    assert binarize.fixed_images(GREY, "none", "test") is GREY


def test_a_dynamic_draw_is_binary_with_the_grey_value_as_probability():
    x = binarize.epoch_images(GREY, "dynamic", 1, 1)
    assert x.shape == GREY.shape and x.dtype == GREY.dtype and is_binary(x)
    # E[x] = p pixel by pixel: over 392,000 draws the mean error is far below 0.01 (std about 0.0008)
    assert abs(float(x.mean() - GREY.mean())) < 0.01
    # a pixel of grey value 0 is never on, one of value 1 always: the grey value is the probability itself
    edges = GREY.clone()
    edges[:, :10], edges[:, 10:20] = 0.0, 1.0
    drawn = binarize.epoch_images(edges, "dynamic", 1, 1)
    assert (drawn[:, :10] == 0).all() and (drawn[:, 10:20] == 1).all()


def test_each_epoch_draws_afresh_and_the_same_epoch_draws_the_same():
    e1, e1_again, e2 = (binarize.epoch_images(GREY, "dynamic", 7, e) for e in (1, 1, 2))
    assert torch.equal(e1, e1_again)  # a function of (seed, epoch): a resumed run sees the same images
    assert not torch.equal(e1, e2)
    assert not torch.equal(e1, binarize.epoch_images(GREY, "dynamic", 8, 1))  # another seed, another draw


def test_held_out_draws_are_fixed_per_split_and_the_same_for_every_seed():
    test = binarize.fixed_images(GREY, "dynamic", "test")
    assert is_binary(test) and torch.equal(test, binarize.fixed_images(GREY, "dynamic", "test"))
    assert not torch.equal(test, binarize.fixed_images(GREY, "dynamic", "validation"))


def test_binary_test_data_has_another_identity():
    assert binarize.data_hash("abc", "none") == "abc"
    dynamic = binarize.data_hash("abc", "dynamic")
    assert dynamic != "abc" and dynamic == binarize.data_hash("abc", "dynamic")


def test_an_unknown_mode_is_refused_with_the_choices(data_env):
    with pytest.raises(ValueError, match="none, dynamic"):
        binarize.epoch_images(GREY, "static", 1, 1)
    with pytest.raises(ParamsError, match="data.binarize: must be one of none, dynamic, got 'static'"):
        parse_params(tiny_raw_params(**{"data.binarize": "static"}))


@pytest.fixture
def binarised(data_env, tmp_path):
    params = parse_params(tiny_raw_params(**{"data.binarize": "dynamic", "train.epochs": 2}))
    paths = Paths(tmp_path)
    run_download(params.data, paths)
    return params, paths


class Recorder:
    """A stepper that keeps the batches training sees and steps nothing."""

    def __init__(self) -> None:
        self.batches: list[torch.Tensor] = []

    def __call__(self, x, eps, coef, full):
        self.batches.append(x.clone())
        return torch.zeros(2)


def test_training_sees_a_fresh_binary_draw_each_epoch_and_evaluation_a_fixed_one(binarised):
    params, paths = binarised
    device = torch.device("cpu")
    data = load_train_data(params, paths, device)
    assert not is_binary(data.x_train) and is_binary(data.x_val)  # train is drawn per epoch, validation once
    state = build_state(params, device)
    seen = []
    for epoch in (1, 2):
        recorder = Recorder()
        train_epoch(state, data.x_train, params.train, params.model.likelihood, 2, recorder, binarize="dynamic")
        state.epoch = epoch
        seen.append(torch.cat(recorder.batches))
        assert is_binary(seen[-1]) and len(seen[-1]) == len(data.x_train)
    # the same images in another order and another draw: the sums of the grey values agree, the draws do not
    assert not torch.equal(seen[0].sum(0), seen[1].sum(0))
    x_test, _ = load_test_split(params, paths, device)
    assert is_binary(x_test) and torch.equal(x_test, load_test_split(params, paths, device)[0])
