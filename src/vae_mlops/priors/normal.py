"""The standard normal prior N(0, I) of Kingma & Welling (2014): no parameters, the KL in closed form."""

from __future__ import annotations

import torch
from torch import Tensor

from vae_mlops.priors.base import LOG_2PI, Prior, PriorConfig


def kl_standard_normal(mu: Tensor, log_std: Tensor) -> Tensor:
    """KL(q(z|x) || N(0, I)) per image, closed form (Kingma & Welling 2014, Appendix B)."""
    return 0.5 * (mu.pow(2) + torch.exp(2 * log_std) - 1 - 2 * log_std).sum(-1)


class NormalPrior(Prior):
    name = "normal"

    def __init__(self, config: PriorConfig) -> None:
        super().__init__()
        self.latent_dim = config.latent_dim
        self.register_buffer("_anchor", torch.empty(0), persistent=False)  # the device and dtype, no state_dict key

    def log_prob(self, z: Tensor) -> Tensor:
        return -0.5 * (z.square() + LOG_2PI).sum(-1)

    def kl(self, mu: Tensor, log_std: Tensor, z: Tensor) -> Tensor:
        return kl_standard_normal(mu, log_std)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        z = torch.randn((n, self.latent_dim), generator=generator)
        return z.to(device=self._anchor.device, dtype=self._anchor.dtype)


PRIOR = NormalPrior
