"""The `mlp`'s ELBO step with a hand-written backward pass: no autograd graph to record.

The network is `archs.mlp.MLPNetwork`'s, its weights taken in `MLPNetwork.LAYERS` order
(`model.VAE.fused_params`): h1 = relu(x W1' + b1); mu, log_std = h1 Wm' + bm, h1 Ws' + bs;
z = mu + eps * exp(log_std); logits = relu(z W3' + b3) W4' + b4; the sums are the likelihood's
reconstruction and the KL to N(0, I) (Kingma & Welling 2014, Appendix B). A layer added to the
`mlp` is added to `LAYERS` and to the two functions below.

The matmuls of the two wide layers, fc1 and fc4 (98% of the FLOPs), run in `mm_dtype` (the
weights' own dtype, or bfloat16); the narrow ones, where bf16 saves nothing, the likelihood, the
KL and every gradient returned stay in the weights' dtype. The casts are written out, so no
autocast dispatch runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from vae_mlops.likelihoods.base import Likelihood


def elbo_forward(
    x: Tensor, eps: Tensor, likelihood: Likelihood, mm_dtype: torch.dtype, params: Sequence[Tensor]
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """(recon, kl) sums, shape (2,), and what `elbo_backward` needs."""
    w1, b1, wm, bm, ws, bs, w3, b3, w4, b4 = params  # (weight, bias) of each of MLPNetwork.LAYERS
    wide = w1.dtype
    low = (lambda t: t) if mm_dtype == wide else (lambda t: t.to(mm_dtype))
    w1_low, w4_low, x_low = low(w1), low(w4), low(x)
    h1 = torch.addmm(low(b1), x_low, w1_low.t()).relu_().to(wide)  # (B, H)
    mu = torch.addmm(bm, h1, wm.t())  # (B, L)
    log_std = torch.addmm(bs, h1, ws.t())
    std = log_std.exp()
    z = torch.addcmul(mu, eps, std)
    h3 = low(torch.addmm(b3, z, w3.t()).relu_())  # (B, H)
    logits = torch.addmm(low(b4), h3, w4_low.t()).to(wide)  # (B, D)
    recon = likelihood.recon_sum(logits, x)
    kl = 0.5 * (mu.square() + std.square() - 1 - 2 * log_std).sum()  # Kingma & Welling 2014, App. B
    return torch.stack([recon, kl]), (x, x_low, eps, h1, mu, std, z, h3, logits, wm, ws, w3, w4_low)


def elbo_backward(
    saved: Sequence[Tensor], likelihood: Likelihood, mm_dtype: torch.dtype, g_recon: Tensor, g_kl: Tensor
) -> tuple[Tensor, ...]:
    """The gradients of g_recon * recon + g_kl * kl, in `params` order."""
    x, x_low, eps, h1, mu, std, z, h3, logits, wm, ws, w3, w4 = saved
    wide = h1.dtype
    low = (lambda t: t) if mm_dtype == wide else (lambda t: t.to(mm_dtype))
    d_logits = likelihood.recon_grad(logits, x, g_recon)  # (B, D)
    d_logits_low = low(d_logits)
    d_h3 = torch.mm(d_logits_low, w4).mul_(h3.sign()).to(wide)  # ReLU: h >= 0, so sign(h) is its 0/1 mask
    d_z = torch.mm(d_h3, w3)
    d_mu = torch.addcmul(d_z, mu, g_kl)  # KL: d/dmu = mu
    d_log_std = d_z.mul_(eps).mul_(std).addcmul_(std.square().sub_(1), g_kl)  # KL: d/dlog_std = std^2 - 1
    d_h1 = torch.mm(d_mu, wm).addmm_(d_log_std, ws).mul_(h1.sign())
    return (
        torch.mm(low(d_h1).t(), x_low).to(wide), d_h1.sum(0),
        torch.mm(d_mu.t(), h1), d_mu.sum(0),
        torch.mm(d_log_std.t(), h1), d_log_std.sum(0),
        torch.mm(d_h3.t(), z), d_h3.sum(0),
        torch.mm(d_logits_low.t(), h3).to(wide), d_logits.sum(0),
    )  # fmt: skip


class FusedELBO(torch.autograd.Function):
    """`elbo_forward` and `elbo_backward` as one autograd function: what DDP and torch.compile see."""

    @staticmethod
    def forward(ctx, x, eps, likelihood: Likelihood, mm_dtype: torch.dtype, *params):
        parts, saved = elbo_forward(x, eps, likelihood, mm_dtype, params)
        ctx.likelihood, ctx.mm_dtype = likelihood, mm_dtype
        ctx.save_for_backward(*saved)
        return parts

    @staticmethod
    def backward(ctx, grad_parts):
        grads = elbo_backward(ctx.saved_tensors, ctx.likelihood, ctx.mm_dtype, grad_parts[0], grad_parts[1])
        return (None, None, None, None, *grads)


def fused_elbo(
    params: Sequence[Tensor], x: Tensor, eps: Tensor, likelihood: Likelihood, mm_dtype: torch.dtype | None = None
) -> Tensor:
    """(recon, kl) sums, shape (2,), differentiable in `params` (`VAE.fused_params`) through the hand-written backward.

    `mm_dtype`: the wide layers' matmul dtype (None: the weights' own).
    """
    return FusedELBO.apply(x, eps, likelihood, mm_dtype or params[0].dtype, *params)


def fused_grads(
    params: Sequence[Tensor],
    x: Tensor,
    eps: Tensor,
    likelihood: Likelihood,
    mm_dtype: torch.dtype | None,
    coef: Tensor,
) -> Tensor:
    """The (recon, kl) sums, with every `.grad` of `params` set to d(coef . sums): `fused_elbo` without autograd.

    The same two functions `FusedELBO` runs, called directly: no graph is recorded and no engine
    runs, which on a CPU is a measurable share of a step at batch 128.
    """
    mm_dtype = mm_dtype or params[0].dtype
    with torch.no_grad():
        parts, saved = elbo_forward(x, eps, likelihood, mm_dtype, params)
        grads = elbo_backward(saved, likelihood, mm_dtype, coef[0], coef[1])
    for p, g in zip(params, grads):
        p.grad = g
    return parts
