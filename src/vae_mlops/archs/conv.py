"""A small convolutional VAE for 28 x 28 images: two stride-2 convolutions each way around a dense layer.

The layout of the DCGAN-style VAEs common on MNIST (e.g. Burgess et al. 2018, without their
extra layers): 28 -> 14 -> 7 feature maps of 32 and 64 channels, a `hidden_dim` dense layer.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from vae_mlops.archs.base import ArchConfig, Architecture, Network

CHANNELS = (32, 64)


class ConvNetwork(Network):
    """Conv(1->32, 4, s2) -> Conv(32->64, 4, s2) -> Linear(64*7*7, h) -> (mu, log_std), and the mirror image."""

    def __init__(self, side: int, hidden_dim: int, latent_dim: int) -> None:
        super().__init__()
        c1, c2 = CHANNELS
        self.side, small = side, side // 4
        flat = c2 * small * small
        self.encoder = nn.Sequential(
            nn.Unflatten(1, (1, side, side)),
            nn.Conv2d(1, c1, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(c1, c2, 4, 2, 1), nn.ReLU(),
            nn.Flatten(), nn.Linear(flat, hidden_dim), nn.ReLU(),
        )  # fmt: skip
        self.fc_mu = nn.Linear(hidden_dim, latent_dim)
        self.fc_log_std = nn.Linear(hidden_dim, latent_dim)
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, hidden_dim), nn.ReLU(),
            nn.Linear(hidden_dim, flat), nn.ReLU(),
            nn.Unflatten(1, (c2, small, small)),
            nn.ConvTranspose2d(c2, c1, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(c1, 1, 4, 2, 1), nn.Flatten(),
        )  # fmt: skip

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.encoder(x)
        return self.fc_mu(h), self.fc_log_std(h)

    def decode_logits(self, z: Tensor) -> Tensor:
        lead = z.shape[:-1]  # IWAE decodes (k, B, L) at once; the convolutions take one batch dimension
        return self.decoder(z.reshape(-1, z.shape[-1])).view(*lead, self.side * self.side)


class Conv(Architecture):
    name = "conv"

    def build(self, config: ArchConfig) -> ConvNetwork:
        side = math.isqrt(config.input_dim)
        if side * side != config.input_dim or side % 4:
            raise ValueError(f"conv needs square images with a side divisible by 4, got input_dim {config.input_dim}")
        return ConvNetwork(side, config.hidden_dim, config.latent_dim)


ARCH = Conv()
