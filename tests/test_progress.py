"""Long steps say how far they are: one training line per epoch with the time left, IWAE and re-score progress."""

from __future__ import annotations

import logging
import re

import pytest

from tests.support.project import tiny_raw_params
from vae_mlops.params import parse_params
from vae_mlops.paths import Paths
from vae_mlops.stages.download import download as run_download
from vae_mlops.stages.train import train as run_train
from vae_mlops.train import progress_note


def test_the_time_left_is_the_mean_epoch_times_the_epochs_to_go():
    assert progress_note(3, 100, 3, 12.0) == "epoch 3/100 (3%), 0:00:12 so far, about 0:06:28 left"
    assert progress_note(10, 10, 10, 3725.0).endswith("1:02:05 so far, about 0:00:00 left")
    # a run resumed at epoch 50 estimates from its own epochs only
    assert progress_note(52, 100, 2, 20.0) == "epoch 52/100 (52%), 0:00:20 so far, about 0:08:00 left"


def test_training_logs_one_line_per_epoch_with_the_time_left(data_env, tmp_path, caplog):
    params = parse_params(tiny_raw_params(**{"train.epochs": 3}))
    paths = Paths(tmp_path / "proj")
    run_download(params.data, paths)
    with caplog.at_level(logging.INFO, logger="vae_mlops"):
        run_train(params, paths)
    lines = [r.getMessage() for r in caplog.records if re.match(r"epoch \d+/3 ", r.getMessage())]
    assert [line.split(" ")[1] for line in lines] == ["1/3", "2/3", "3/3"]
    assert all("so far, about" in line and "left" in line for line in lines)


@pytest.mark.parametrize("n_batches", [1, 7])
def test_iwae_reports_its_progress(n_batches, caplog):
    import torch

    from vae_mlops import metrics
    from vae_mlops.model import VAE, VAEConfig

    torch.manual_seed(0)
    vae = VAE(VAEConfig(784, 16, 2, "bernoulli")).eval()
    x = torch.rand(10 * n_batches, 784)
    with caplog.at_level(logging.INFO, logger="vae_mlops"):
        metrics.iwae_bound(vae, x, 4, 10, 0)
    notes = [r.getMessage() for r in caplog.records if "IWAE" in r.getMessage()]
    assert notes and notes[-1].startswith(f"IWAE k=4: {10 * n_batches}/{10 * n_batches} images")
