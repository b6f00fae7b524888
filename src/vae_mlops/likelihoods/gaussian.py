"""Gaussian p(x|z) = N(x; sigmoid(l), 1/2): the tutorial's MSE-sum, whose constant `log_prob` adds back."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vae_mlops.likelihoods.base import Likelihood


class Gaussian(Likelihood):
    name = "gaussian"

    def mean(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits)

    def recon_loss(self, logits: Tensor, x: Tensor) -> Tensor:
        """sum (sigmoid(l) - x)^2: -log N(x; x_hat, 1/2) without its constant."""
        return (torch.sigmoid(logits) - x).pow(2).sum(-1)

    def nll_constant(self, dim: int) -> float:
        return 0.5 * dim * math.log(math.pi)  # (D/2) log(2 pi sigma^2) with sigma^2 = 1/2

    def recon_sum(self, logits: Tensor, x: Tensor) -> Tensor:
        return (torch.sigmoid(logits) - x).pow(2).sum()

    def recon_grad(self, logits: Tensor, x: Tensor, grad: Tensor) -> Tensor:
        p = torch.sigmoid(logits)
        return (p - x).mul_(p).mul_(1 - p).mul_(2 * grad)  # d/dl (p - x)^2 = 2 (p - x) p (1 - p)


LIKELIHOOD = Gaussian()
