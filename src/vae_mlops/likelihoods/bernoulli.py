"""Bernoulli p(x|z) on grey values: the PyTorch example's binary cross-entropy (Kingma & Welling 2014, App. C.1).

On grey values x in [0, 1] it is not a normalised density (that is the continuous
Bernoulli's normaliser); its -log p is the BCE summed over pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vae_mlops.likelihoods.base import ExponentialFamily, softplus, softplus_sum, softplus_sum_


class Bernoulli(ExponentialFamily):
    name = "bernoulli"

    def log_partition(self, logits: Tensor) -> Tensor:
        return softplus(logits)  # A(l) = log(1 + e^l)

    def log_partition_sum(self, logits: Tensor) -> Tensor:
        return softplus_sum(logits)

    def log_partition_sum_(self, logits: Tensor, scratch: Tensor) -> Tensor:
        return softplus_sum_(logits, scratch)

    def mean(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits)

    def recon_loss(self, logits: Tensor, x: Tensor) -> Tensor:
        """BCE from the logits, torch's own kernel: the reference the fused sums are tested against."""
        return F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)


LIKELIHOOD = Bernoulli()
