"""Real MNIST and Fashion-MNIST from the offline copies in `../shared/data/` (see its README.md).

The sha256 values in `datasets.py` are checked against the real files and against the README's table (an
independent record); then the project's own download and train stages fit the real digits for 2 epochs, and
the model must score test digits far above uniform noise and above the same digits' pixels shuffled.
"""

from __future__ import annotations

import gzip
import hashlib
import re
from pathlib import Path

import pytest
import torch

from tests.support.project import tiny_raw_params
from tests.support.requires import real_mnist_mirror, require
from vae_mlops import checkpoint
from vae_mlops.data import load_split
from vae_mlops.datasets import BUILTIN, get_dataset
from vae_mlops.model import elbo
from vae_mlops.params import parse_params
from vae_mlops.paths import Paths
from vae_mlops.stages.download import download as run_download
from vae_mlops.stages.train import train as run_train
from vae_mlops.train import to_unit_float

MNIST = real_mnist_mirror()  # the offline copy, from VAE_DATA_MIRROR as CI sets it
SHARED = MNIST.parent  # beside it: fashion-mnist/ and the README with the checksums


@pytest.fixture(scope="module")
def shared() -> Path:
    """The offline copies; the test skips without them (fails when CI=true)."""
    require(
        (MNIST / "train-images-idx3-ubyte.gz").is_file() and (SHARED / "README.md").is_file(),
        f"the offline MNIST copy ({MNIST}, with {SHARED}/README.md)",
        "set VAE_DATA_MIRROR to the folder holding MNIST's four .gz files (../shared/data/mnist)",
    )
    return SHARED

# Margins in nats per image (single-sample ELBO, bernoulli likelihood on grey values). Measured after 2 epochs:
# digits about -125, shuffled pixels about -440, uniform noise about -2400; the margins leave room for seeds.
OVER_SHUFFLED_NATS = 150.0
OVER_NOISE_NATS = 1000.0


def _readme_sha256() -> dict[str, str]:
    rows = re.findall(r"^\| ([\w-]+/[\w-]+) \| ([0-9a-f]{64}) \|", (SHARED / "README.md").read_text(), re.MULTILINE)
    return dict(rows)


@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist"])
def test_builtin_checksums_are_the_real_files(dataset, shared):
    spec, readme = BUILTIN[dataset], _readme_sha256()
    for f in spec.files:
        content = gzip.decompress((SHARED / dataset / f"{f.name}.gz").read_bytes())
        assert hashlib.sha256(content).hexdigest() == f.sha256, f"{dataset}/{f.name}: datasets.py's sha256 is wrong"
        assert readme[f"{dataset}/{f.name}"] == f.sha256, f"{dataset}/{f.name}: differs from {SHARED}/README.md"
        assert int.from_bytes(content[4:8], "big") == f.count


@pytest.fixture(scope="module")
def trained_on_mnist(tmp_path_factory, shared) -> Paths:
    """The download and train stages on real MNIST (the repo's model and params, 2 epochs, CPU)."""
    paths = Paths(tmp_path_factory.mktemp("real-mnist"))
    overrides = {"data.dataset": "mnist", "model.hidden_dim": 400, "model.latent_dim": 20, "train.epochs": 2,
                 "train.batch_size": 128, "train.val_size": 5000, "train.image_every": 2}  # fmt: skip
    params = parse_params(tiny_raw_params(**overrides))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VAE_DATA_MIRROR", str(MNIST))
        run_download(params.data, paths)  # verifies every file's sha256 on the way in
    run_train(params, paths)
    return paths


@pytest.mark.slow
def test_test_digits_beat_noise_and_shuffled_pixels_by_a_margin(trained_on_mnist):
    paths = trained_on_mnist
    model, _ = checkpoint.load_model(paths.model_file)
    images, _ = load_split(paths.raw_dir("mnist"), get_dataset("mnist"), "test")
    x = to_unit_float(images[:2000], torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(x.shape, generator=g)
    shuffled = torch.stack([row[torch.randperm(x.shape[1], generator=g)] for row in x])  # same grey values per image

    def mean_elbo(batch: torch.Tensor) -> float:
        return elbo(model.eval(), batch, torch.Generator().manual_seed(1)).mean().item()

    digits, shuffled_elbo, noise_elbo = mean_elbo(x), mean_elbo(shuffled), mean_elbo(noise)
    print(f"ELBO nats/image: digits {digits:.1f}, shuffled {shuffled_elbo:.1f}, noise {noise_elbo:.1f}")
    assert digits > shuffled_elbo + OVER_SHUFFLED_NATS, (digits, shuffled_elbo)
    assert digits > noise_elbo + OVER_NOISE_NATS, (digits, noise_elbo)
    assert digits > -200.0  # 2 epochs of the PyTorch example's VAE: about -125 nats on test digits
