"""What the scoring server records about each image it answers: its ELBO under the served model and its latent mean.

The ELBO is the single-sample bound with one fixed noise row (`ELBO_SEED`), the
same number `output=elbo` answers, so an image gets the same score in any batch
and the monitor's reference (the validation split, scored here when a version is
registered) and the traffic it is compared with are scored alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vae_mlops.model import VAE, elbo

ELBO_SEED = 0  # the single-sample ELBO's one noise row: an image gets the same score in any batch
BATCH = 4096  # images per forward pass when scoring a whole split


@dataclass(frozen=True)
class Scores:
    """Per-image scores: `elbo` (N,) nats, `mu` (N, L) latent means, both float32."""

    elbo: np.ndarray
    mu: np.ndarray


def elbo_noise(latent_dim: int) -> torch.Tensor:
    """(1, latent_dim) standard normal noise from `ELBO_SEED`, shared by every image of every request."""
    return torch.randn((1, latent_dim), generator=torch.Generator().manual_seed(ELBO_SEED))


def as_unit_float(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, 784) float32 on [0, 1] from floats on [0, 1] or uint8 grey levels."""
    t = torch.as_tensor(x)
    if t.dtype == torch.uint8:
        return t.reshape(len(t), -1).float() / 255
    return t.reshape(len(t), -1).float()


@torch.no_grad()
def served_scores(vae: VAE, x: np.ndarray | torch.Tensor) -> Scores:
    """ELBO with the fixed noise and latent mean of each image, as the scoring server records them."""
    xt = as_unit_float(x)
    noise = elbo_noise(vae.config.latent_dim)
    elbos, mus = [], []
    for start in range(0, len(xt), BATCH):
        chunk = xt[start : start + BATCH]
        elbos.append(elbo(vae, chunk, eps=noise))  # (B,)
        mus.append(vae.encode(chunk)[0])  # (B, L)
    if not elbos:
        return Scores(np.zeros(0, np.float32), np.zeros((0, vae.config.latent_dim), np.float32))
    return Scores(torch.cat(elbos).float().numpy(), torch.cat(mus).float().numpy())
