"""What a prior p(z) owns: log p(z) (for IWAE), the ELBO's KL term, samples, and clusters if it has them.

A prior is a module of the VAE (`vae.prior`): a learnable prior's parameters are in the
model's state_dict under `prior.`, and a fixed one adds no key.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Protocol

import torch
from torch import Tensor, nn

LOG_2PI = math.log(2 * math.pi)


class PriorConfig(Protocol):
    """The fields of `model.VAEConfig` a prior reads."""

    latent_dim: int
    n_components: int


def log_normal(z: Tensor, mu: Tensor, log_std: Tensor) -> Tensor:
    """log N(z; mu, diag(exp(log_std)^2)), summed over the last dimension."""
    return (-0.5 * ((z - mu) * torch.exp(-log_std)).pow(2) - log_std - 0.5 * LOG_2PI).sum(-1)


class Prior(nn.Module, ABC):
    """p(z) over `latent_dim` dimensions; built from the model's config (`Prior(config)`, a `PriorConfig`)."""

    name: str
    n_components: int = 0  # clusters of a mixture prior, q(c|x) over them; 0: the prior has none
    mixture: bool = False  # whether `VAEConfig.n_components` shapes the prior

    @abstractmethod
    def log_prob(self, z: Tensor) -> Tensor:
        """log p(z) in nats, (..., L) -> (...)."""

    @abstractmethod
    def kl(self, mu: Tensor, log_std: Tensor, z: Tensor) -> Tensor:
        """The ELBO's regulariser per image (B,): what training adds to the reconstruction term.

        `z` is the reparameterised sample of q(z|x) the reconstruction used; a prior whose
        term is in closed form may ignore it.
        """

    @abstractmethod
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n draws of z (n, L) on the prior's device; the generator is a CPU one (same z on every device)."""

    def responsibilities(self, z: Tensor) -> Tensor:
        """q(c|x) for a mixture prior, (..., K) summing to 1; only priors with `n_components` > 0 have it."""
        raise NotImplementedError(f"the {self.name} prior has no components")

    def initialise(self, codes: Tensor, groups: Tensor | None) -> None:
        """Fit the prior to an autoencoder's codes (N, L) before training; a fixed prior has nothing to fit.

        `groups` (N,) puts each code in one of `n_components` clusters (`code_partition`); None for a prior without.
        """

    def __repr__(self) -> str:
        return f"<prior {self.name}>"
