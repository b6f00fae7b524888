"""Binarised MNIST (`data.binarize`), the protocol behind the likelihoods the literature reports.

Grey values under a Bernoulli p(x|z) are not a pmf of the data, so published MNIST
log-likelihoods are on binary pixels: each pixel is a Bernoulli draw with its grey
value as probability (Salakhutdinov & Murray 2008). Training draws afresh every epoch
("dynamic" binarisation, Burda, Grosse & Salakhutdinov 2016, section 5), which acts as
a regulariser; validation and test are drawn once, with a fixed seed, so every model of
one binarisation is scored on the same binary images.

`none` leaves the grey values untouched. Likelihood metrics compare only between models
of one binarisation (`metric_catalogue`), and the registry gate never compares across.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from vae_mlops import atomic

MODES = ("none", "dynamic")
NONE = "none"
# The fixed draws of validation, test and the probe's training images: constants, not `train.seed`,
# so that models trained with other seeds are still scored on the same binary test images.
FIXED_SEEDS = {"validation": 1, "test": 2, "probe": 3}
_EPOCH_STREAM = 0xB1  # keeps the epochs' draws apart from any other use of (train.seed, epoch)


def _generator(device: torch.device, *entropy: int) -> torch.Generator:
    """A generator seeded from several integers at once (numpy's SeedSequence mixes them)."""
    seed = int(np.random.SeedSequence(list(entropy)).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(seed)


def draw(x: Tensor, generator: torch.Generator) -> Tensor:
    """Binary pixels (float, 0 or 1) with P(1) = the grey value: one vectorised draw over every image."""
    return torch.bernoulli(x, generator=generator)


def epoch_images(x: Tensor, mode: str, seed: int, epoch: int) -> Tensor:
    """The training images of epoch `epoch` (1-based): a fresh draw under `dynamic`, `x` itself under `none`.

    A function of (seed, epoch) alone and drawn over the whole split in its own order, so a
    resumed run, and a run on any number of DDP ranks, sees the same binary images.
    """
    check_mode(mode)
    if mode == NONE:
        return x
    return draw(x, _generator(x.device, seed, epoch, _EPOCH_STREAM))


def fixed_images(x: Tensor, mode: str, split: str) -> Tensor:
    """Held-out images under `mode`: one seeded draw per split (the same for every model), or `x` under `none`."""
    check_mode(mode)
    if mode == NONE:
        return x
    return draw(x, _generator(x.device, FIXED_SEEDS[split]))


def data_hash(base_hash: str, mode: str) -> str:
    """The identity of the scored test data: binary images are other data than the grey ones they come from."""
    check_mode(mode)
    if mode == NONE:
        return base_hash  # unchanged: champions scored before binarisation existed need no re-scoring
    return atomic.sha256_bytes(f"{base_hash}\nbinarize {mode} seed {FIXED_SEEDS['test']}\n".encode())


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"data.binarize must be one of {', '.join(MODES)}, got {mode!r}")
