"""What a likelihood p(x|z) owns: its loss, log p(x|z) in nats, the fused step's sum and gradient.

The decoder ends in one logit per pixel, l = h W' + b with h the decoder's hidden layer.
A likelihood turns those logits into everything the model, the training step and
the metrics need, so a new likelihood is one new module in this package.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor


def softplus(logits: Tensor) -> Tensor:
    """softplus(l) = max(l, 0) + log(1 + exp(-|l|)), exact to float32 rounding.

    Four vectorised kernels instead of torch's scalar-looped CPU softplus (and log1p):
    a large share of a training step and of the IWAE evaluation (see BENCHMARKS.md).
    """
    if torch.is_grad_enabled() and logits.requires_grad:  # the in-place kernels below have no backward
        return F.softplus(logits)
    return torch.exp(-logits.abs()).add_(1).log_().add_(logits.clamp(min=0))


def softplus_sum(logits: Tensor) -> Tensor:
    """sum of softplus over the last dimension, with a sixteenth of the logarithms; `logits` is left as it is.

    softplus(l) = max(l, 0) + log(1 + e^-|l|) = max(l, 0) - log sigmoid(|l|): one vectorised
    sigmoid instead of exp, negation and +1 (exp is the slowest of them). The logarithms are
    taken of products over groups of up to 16 pixels: each factor sigmoid(|l|) is in [1/2, 1),
    so a product stays above 2^-16.
    """
    if torch.is_grad_enabled() and logits.requires_grad:  # the in-place kernels below have no backward
        return F.softplus(logits).sum(-1)
    return logits.clamp(min=0).sum(-1) - _log_sigmoid_sum_(logits.abs())


def softplus_sum_(logits: Tensor, scratch: Tensor) -> Tensor:
    """`softplus_sum` that overwrites `logits` and `scratch` (same shape): nothing as large is allocated.

    The IWAE decoder calls it on buffers reused from chunk to chunk. l + |l| = 2 max(l, 0) exactly,
    so sum max(l, 0) keeps every float32 digit (sum l + sum |l| would cancel on a digit's background).
    """
    a = torch.abs(logits, out=scratch)
    positive = logits.add_(a).sum(-1).mul_(0.5)
    return positive.sub_(_log_sigmoid_sum_(a))


def _log_sigmoid_sum_(a: Tensor) -> Tensor:
    """sum of log sigmoid(a) over the last dimension for a >= 0, one logarithm per group; overwrites `a`."""
    d = a.shape[-1]
    group = next(g for g in range(16, 0, -1) if d % g == 0)
    return a.sigmoid_().view(*a.shape[:-1], d // group, group).prod(-1).log_().sum(-1)


class Likelihood(ABC):
    """p(x|z) given the decoder's logits: one instance per likelihood, registered by `name`."""

    name: str

    @abstractmethod
    def mean(self, logits: Tensor) -> Tensor:
        """E[x|z], pixel means on [0, 1]: what `VAE.decode` returns."""

    @abstractmethod
    def recon_loss(self, logits: Tensor, x: Tensor) -> Tensor:
        """The ELBO's reconstruction term per image, summed over pixels: what training minimises."""

    def nll_constant(self, dim: int) -> float:
        """What `recon_loss` leaves out of -log p(x|z) for `dim` pixels (a constant of the parameters)."""
        return 0.0

    def log_prob(self, logits: Tensor, x: Tensor) -> Tensor:
        """log p(x|z) in nats per image."""
        return -(self.recon_loss(logits, x) + self.nll_constant(x.shape[-1]))

    def recon_sum(self, logits: Tensor, x: Tensor) -> Tensor:
        """`recon_loss` summed over the batch: the fused step's forward, in as few kernels as it can."""
        return self.recon_loss(logits, x).sum()

    @abstractmethod
    def recon_grad(self, logits: Tensor, x: Tensor, grad: Tensor) -> Tensor:
        """grad * d recon_sum / d logits, (B, D): the fused step's backward, from the saved logits."""

    def __repr__(self) -> str:
        return f"<likelihood {self.name}>"


class ExponentialFamily(Likelihood):
    """p(x|l) = exp(x l - A(l)) h(x) per pixel, l the logit as natural parameter (h = 1 here).

    -log p(x|z) = sum A(l) - x.l, and its gradient in l is A'(l) - x with A'(l) = E[x]: each
    member defines only its log-partition `log_partition` (A) and `mean` (A').
    """

    @abstractmethod
    def log_partition(self, logits: Tensor) -> Tensor:
        """A(l), elementwise."""

    def log_partition_sum(self, logits: Tensor) -> Tensor:
        """A(l) summed over the last dimension (pixels): where a member can save work, without autograd."""
        return self.log_partition(logits).sum(-1)

    def log_partition_sum_(self, logits: Tensor, scratch: Tensor) -> Tensor:
        """`log_partition_sum` that may overwrite `logits` and `scratch` (same shape): `accel.iwae_log_px`'s buffers."""
        return self.log_partition_sum(logits)

    def recon_loss(self, logits: Tensor, x: Tensor) -> Tensor:
        return (self.log_partition(logits) - x * logits).sum(-1)

    def recon_sum(self, logits: Tensor, x: Tensor) -> Tensor:
        return self.log_partition_sum(logits).sum() - torch.dot(logits.reshape(-1), x.reshape(-1))

    def recon_grad(self, logits: Tensor, x: Tensor, grad: Tensor) -> Tensor:
        return self.mean(logits).sub_(x).mul_(grad)
