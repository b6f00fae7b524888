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

    def log_partition_sum_(self, logits: Tensor, scratch: Tensor) -> Tensor:
        """`log_partition_sum` that may overwrite `logits` and `scratch` (same shape), buffers of the IWAE loop."""
        return self.log_partition_sum(logits)

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

        Only A(l) needs the full logits, so each chunk costs one matmul and a few passes over its
        output. Without autograd these are written into buffers made once for all chunks (a fresh
        allocation that large costs page faults on every chunk) and `hidden`'s output, which must be
        a fresh tensor, is overwritten. `mm_dtype` (e.g. bfloat16) runs that matmul in another dtype,
        A(l) staying in x's.
        """
        weight, bias = out.weight, out.bias  # (D, H), (D,)
        x_w, x_b = x @ weight, x @ bias  # (B, H), (B,)
        mm_dtype = mm_dtype or weight.dtype
        w_low, b_low = weight.to(mm_dtype), bias.to(mm_dtype)
        in_place = not torch.is_grad_enabled()
        if in_place:
            rows = min(per, len(z)) * x.shape[0]
            buf, scratch = (torch.empty((rows, weight.shape[0]), dtype=x.dtype, device=x.device) for _ in range(2))
            buf_low = buf if mm_dtype == x.dtype else torch.empty(buf.shape, dtype=mm_dtype, device=x.device)
        parts = []
        for zc in z.split(per):
            h = hidden(zc)  # (n, B, H)
            h_low = h.flatten(0, 1).to(mm_dtype)
            if not in_place:
                logits = torch.addmm(b_low, h_low, w_low.t()).to(x.dtype)  # (n*B, D)
                a_sum = self.log_partition_sum(logits).view(h.shape[:2])
                parts.append((h * x_w).sum(-1) + x_b - a_sum)
                continue
            n = len(h_low)
            logits = torch.addmm(b_low, h_low, w_low.t(), out=buf_low[:n])
            if logits.dtype != x.dtype:
                logits = buf[:n].copy_(logits)
            a_sum = self.log_partition_sum_(logits, scratch[:n]).view(h.shape[:2])
            parts.append(h.mul_(x_w).sum(-1).add_(x_b).sub_(a_sum))  # h is spent: its product in place
        return torch.cat(parts)
