"""log p(x|z) of k samples per image through the decoder's last Linear layer: the IWAE bound's inner loop.

For an exponential-family likelihood (`likelihoods.base.ExponentialFamily`), -log p(x|z) = sum A(l) - x.l,
and x.l = (x W) . h + x . b with (W, b) the output layer: a (B, H) product made once, so each chunk of
samples costs one matmul and a few passes over its output. Without autograd those passes write into
buffers made once for all chunks (a fresh allocation that large costs page faults on every chunk).
Any other likelihood decodes a chunk at a time and takes its `log_prob`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vae_mlops.likelihoods.base import ExponentialFamily, Likelihood


def iwae_log_px(
    likelihood: Likelihood,
    hidden: Callable[[Tensor], Tensor],
    out: nn.Linear,
    x: Tensor,
    z: Tensor,
    per: int,
    mm_dtype: torch.dtype | None = None,
) -> Tensor:
    """log p(x|z) for z (k, B, L) and x (B, D) -> (k, B), `per` samples at a time.

    `hidden` maps z to the input of `out`, the decoder's output layer (`Network.decode_hidden`,
    `Network.output_layer`), as a fresh tensor that may be overwritten; `mm_dtype` (e.g. bfloat16)
    runs the output layer's matmul in that dtype, the likelihood staying in x's.
    """
    mm_dtype = mm_dtype or out.weight.dtype
    if isinstance(likelihood, ExponentialFamily):
        return _exponential_family(likelihood, hidden, out, x, z, per, mm_dtype)
    w, b = out.weight.to(mm_dtype), out.bias.to(mm_dtype)
    logits = (F.linear(hidden(zc).to(mm_dtype), w, b).to(x.dtype) for zc in z.split(per))
    return torch.cat([likelihood.log_prob(lc, x) for lc in logits])


def _exponential_family(
    likelihood: ExponentialFamily,
    hidden: Callable[[Tensor], Tensor],
    out: nn.Linear,
    x: Tensor,
    z: Tensor,
    per: int,
    mm_dtype: torch.dtype,
) -> Tensor:
    """sum x.l - A(l) per (sample, image), with only A(l) taken of the full logits."""
    weight, bias = out.weight, out.bias  # (D, H), (D,)
    x_w, x_b = x @ weight, x @ bias  # (B, H), (B,)
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
            a_sum = likelihood.log_partition_sum(logits).view(h.shape[:2])
            parts.append((h * x_w).sum(-1) + x_b - a_sum)
            continue
        n = len(h_low)
        logits = torch.addmm(b_low, h_low, w_low.t(), out=buf_low[:n])
        if logits.dtype != x.dtype:
            logits = buf[:n].copy_(logits)
        a_sum = likelihood.log_partition_sum_(logits, scratch[:n]).view(h.shape[:2])
        parts.append(h.mul_(x_w).sum(-1).add_(x_b).sub_(a_sum))  # h is spent: its product in place
    return torch.cat(parts)
