"""What a likelihood p(x|z) owns: its loss, log p(x|z) in nats, the fused step's sum and gradient, the IWAE path.

The decoder ends in one logit per pixel, l = h W' + b with h the decoder's hidden layer.
A likelihood turns those logits into everything the model, the training step and
the metrics need, so a new likelihood is one new module in this package.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def softplus(logits: Tensor) -> Tensor:
    """softplus(l) = max(l, 0) + log(1 + exp(-|l|)), exact to float32 rounding.

    Four vectorised kernels instead of torch's scalar-looped CPU softplus (and log1p):
    a large share of a training step and of the IWAE evaluation (see BENCHMARKS.md).
    """
    if torch.is_grad_enabled() and logits.requires_grad:  # the in-place kernels below have no backward
        return F.softplus(logits)
    return torch.exp(-logits.abs()).add_(1).log_().add_(logits.clamp(min=0))


def softplus_sum(logits: Tensor) -> Tensor:
    """sum of softplus over the last dimension, with a sixteenth of the logarithms.

    sum max(l, 0) + log prod (1 + e^-|l|), the product taken over groups of up to 16
    pixels (each factor is in (1, 2], so a group's product stays below 2^16).
    """
    if torch.is_grad_enabled() and logits.requires_grad:  # the in-place kernels below have no backward
        return F.softplus(logits).sum(-1)
    d = logits.shape[-1]
    group = next(g for g in range(16, 0, -1) if d % g == 0)
    factors = logits.abs().neg_().exp_().add_(1)
    logs = factors.view(*logits.shape[:-1], d // group, group).prod(-1).log_()
    return logs.sum(-1) + logits.clamp(min=0).sum(-1)


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

    def iwae_log_px(
        self,
        hidden: Callable[[Tensor], Tensor],
        out: nn.Linear,
        x: Tensor,
        z: Tensor,
        per: int,
        mm_dtype: torch.dtype | None = None,
    ) -> Tensor:
        """log p(x|z) for z (k, B, L) and x (B, D) -> (k, B), `per` samples at a time.

        `hidden` maps z to the decoder's hidden layer and `out` is its output layer; `mm_dtype`
        (e.g. bfloat16) runs the output layer's matmul in another dtype, the likelihood staying in x's.
        """
        mm_dtype = mm_dtype or out.weight.dtype
        w, b = out.weight.to(mm_dtype), out.bias.to(mm_dtype)
        logits = (F.linear(hidden(zc).to(mm_dtype), w, b).to(x.dtype) for zc in z.split(per))
        return torch.cat([self.log_prob(lc, x) for lc in logits])

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

    def recon_loss(self, logits: Tensor, x: Tensor) -> Tensor:
        return (self.log_partition(logits) - x * logits).sum(-1)

    def recon_sum(self, logits: Tensor, x: Tensor) -> Tensor:
        return self.log_partition_sum(logits).sum() - torch.dot(logits.reshape(-1), x.reshape(-1))

    def recon_grad(self, logits: Tensor, x: Tensor, grad: Tensor) -> Tensor:
        return self.mean(logits).sub_(x).mul_(grad)

    def iwae_log_px(
        self,
        hidden: Callable[[Tensor], Tensor],
        out: nn.Linear,
        x: Tensor,
        z: Tensor,
        per: int,
        mm_dtype: torch.dtype | None = None,
    ) -> Tensor:
        """x.l = (x W) . h + x . b with (W, b) the output layer: a (B, H) product made once.

        Only A(l) needs the full logits, so each chunk costs one matmul and one pass over its
        output; `mm_dtype` (e.g. bfloat16) runs that matmul in another dtype, A(l) staying in x's.
        """
        weight, bias = out.weight, out.bias  # (D, H), (D,)
        x_w, x_b = x @ weight, x @ bias  # (B, H), (B,)
        mm_dtype = mm_dtype or weight.dtype
        w_low, b_low = weight.to(mm_dtype), bias.to(mm_dtype)
        parts = []
        for zc in z.split(per):
            h = hidden(zc)  # (n, B, H)
            logits = torch.addmm(b_low, h.flatten(0, 1).to(mm_dtype), w_low.t()).to(x.dtype)  # (n*B, D)
            a_sum = self.log_partition_sum(logits).view(h.shape[:2])
            parts.append((h * x_w).sum(-1) + x_b - a_sum)
        return torch.cat(parts)
