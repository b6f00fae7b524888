"""Pictures of a model: sample and reconstruction grids, made with torchvision's grid utilities."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torchvision.utils import make_grid, save_image

from vae_mlops import atomic
from vae_mlops.model import VAE

SIDE = 28


def _as_images(flat: Tensor) -> Tensor:
    """(N, 784) on [0, 1] -> (N, 1, 28, 28) on the CPU."""
    return flat.detach().float().cpu().clamp(0, 1).view(-1, 1, SIDE, SIDE)


@torch.no_grad()
def sample_grid(model: VAE, n: int = 64, seed: int = 0) -> Tensor:
    """Decoded z ~ N(0, I), as one (3, H, W) grid; the seed keeps the same z across epochs."""
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((n, model.config.latent_dim), generator=g).to(device)
    return make_grid(_as_images(model.decode(z)), nrow=8, padding=2)


@torch.no_grad()
def reconstruction_grid(model: VAE, x: Tensor, n: int = 8) -> Tensor:
    """Inputs in the top row, their reconstructions (decoding z = mu) below."""
    mu, _ = model.encode(x[:n])
    both = torch.cat([_as_images(x[:n]), _as_images(model.decode(mu))])
    return make_grid(both, nrow=n, padding=2)


def save_png(grid: Tensor, path: Path) -> Path:
    """Write a grid as PNG atomically (save_image needs the format, the temp name has none)."""
    atomic.write_with(path, lambda tmp: save_image(grid, tmp, format="png"))
    return path


def to_hwc_uint8(grid: Tensor):
    """(3, H, W) float grid -> (H, W, 3) uint8 numpy, the form `mlflow.log_image` takes."""
    return grid.mul(255).round().clamp(0, 255).byte().permute(1, 2, 0).cpu().numpy()
