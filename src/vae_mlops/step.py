"""One training step: the batch's (recon, kl) sums, their gradients and Adam, eagerly or as a CUDA graph.

`FusedELBO` is the forward pass and a hand-written backward pass of the ELBO (Kingma &
Welling 2014) with no autograd graph to record; the likelihood supplies the reconstruction
sum and its gradient in the logits. In `bf16` the matmuls of its two wide layers run in
bfloat16 while the weights (Adam's master copy), the likelihood, the KL and the sums stay in
float32: the casts are written out, so no autocast dispatch runs. Autograd (`train.fused: false`, torch.compile)
remains the reference the fused step is tested against.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import Tensor, nn

from vae_mlops.distributed import Single
from vae_mlops.likelihoods import Likelihood
from vae_mlops.model import VAE, kl_divergence
from vae_mlops.params import TrainParams
from vae_mlops.precision import resolve_precision

log = logging.getLogger(__name__)

GRAPH_WARMUP = 3  # eager steps before a CUDA graph is captured (initialises Adam's state)
LAYERS = ("fc1", "fc_mu", "fc_log_std", "fc3", "fc4")  # `VAE`'s Linear layers, by attribute name
PARAMS = tuple(f"{layer}.{p}" for layer in LAYERS for p in ("weight", "bias"))  # FusedELBO's inputs, in this order


def layer_params(model: VAE) -> list[Tensor]:
    """The model's weights and biases in `PARAMS` order, looked up by name."""
    named = dict(model.named_parameters())
    return [named[name] for name in PARAMS]


class FusedELBO(torch.autograd.Function):
    """(recon, kl) sums of a batch with a hand-written backward pass; same maths as autograd.

    Inputs after (x, eps, likelihood, mm_dtype) are the tensors named by `PARAMS`. The network is
    `model.VAE`'s: h1 = relu(x W1' + b1); mu, log_std = h1 Wm' + bm, h1 Ws' + bs;
    z = mu + eps * exp(log_std); logits = relu(z W3' + b3) W4' + b4. The matmuls of the two wide
    layers, fc1 and fc4 (98% of the FLOPs), run in `mm_dtype` (the weights' own dtype, or bfloat16);
    the narrow ones (fc_mu, fc_log_std, fc3), where bf16 saves nothing, the likelihood, the KL and
    every gradient returned stay in the weights' dtype.
    """

    @staticmethod
    def forward(ctx, x, eps, likelihood: Likelihood, mm_dtype: torch.dtype, *params):  # noqa: PLR0913
        p = dict(zip(PARAMS, params))
        wide = p["fc1.weight"].dtype
        low = lambda t: t.to(mm_dtype)  # noqa: E731  (a no-op when mm_dtype is the weights' dtype)
        w1, w4 = low(p["fc1.weight"]), low(p["fc4.weight"])
        wm, ws, w3 = p["fc_mu.weight"], p["fc_log_std.weight"], p["fc3.weight"]
        x_low = low(x)
        h1 = torch.addmm(low(p["fc1.bias"]), x_low, w1.t()).relu_().to(wide)  # (B, H)
        mu = torch.addmm(p["fc_mu.bias"], h1, wm.t())  # (B, L)
        log_std = torch.addmm(p["fc_log_std.bias"], h1, ws.t())
        std = log_std.exp()
        z = torch.addcmul(mu, eps, std)
        h3 = low(torch.addmm(p["fc3.bias"], z, w3.t()).relu_())  # (B, H)
        logits = torch.addmm(low(p["fc4.bias"]), h3, w4.t()).to(wide)  # (B, D)
        recon = likelihood.recon_sum(logits, x)
        kl = 0.5 * (mu.square() + std.square() - 1 - 2 * log_std).sum()  # Kingma & Welling 2014, App. B
        ctx.likelihood, ctx.wide, ctx.mm_dtype = likelihood, wide, mm_dtype
        ctx.save_for_backward(x, x_low, eps, h1, mu, std, z, h3, logits, wm, ws, w3, w4)
        return torch.stack([recon, kl])

    @staticmethod
    def backward(ctx, grad_parts):
        x, x_low, eps, h1, mu, std, z, h3, logits, wm, ws, w3, w4 = ctx.saved_tensors
        wide, mm_dtype = ctx.wide, ctx.mm_dtype
        low = lambda t: t.to(mm_dtype)  # noqa: E731
        g_recon, g_kl = grad_parts[0], grad_parts[1]
        d_logits = ctx.likelihood.recon_grad(logits, x, g_recon)  # (B, D)
        d_logits_low = low(d_logits)
        d_h3 = torch.ops.aten.threshold_backward(torch.mm(d_logits_low, w4), h3, 0).to(wide)
        d_z = torch.mm(d_h3, w3)
        d_mu = torch.addcmul(d_z, mu, g_kl)  # KL: d/dmu = mu
        d_log_std = d_z.mul_(eps).mul_(std).addcmul_(std.square().sub_(1), g_kl)  # KL: d/dlog_std = std^2 - 1
        d_h1 = torch.mm(d_mu, wm).addmm_(d_log_std, ws)
        d_h1 = torch.ops.aten.threshold_backward(d_h1, h1, 0)
        return (
            None, None, None, None,
            torch.mm(low(d_h1).t(), x_low).to(wide), d_h1.sum(0),
            torch.mm(d_mu.t(), h1), d_mu.sum(0),
            torch.mm(d_log_std.t(), h1), d_log_std.sum(0),
            torch.mm(d_h3.t(), z), d_h3.sum(0),
            torch.mm(d_logits_low.t(), h3).to(wide), d_logits.sum(0),
        )  # fmt: skip


def fused_elbo(model: VAE, x: Tensor, eps: Tensor, mm_dtype: torch.dtype | None = None) -> Tensor:
    """`FusedELBO` on `model`'s own weights: (recon, kl) sums, shape (2,)."""
    params = layer_params(model)
    return FusedELBO.apply(x, eps, model.likelihood, mm_dtype or params[0].dtype, *params)


class ELBOSums(nn.Module):
    """Module form of a batch's (recon, kl) sums, shape (2,): what DDP and torch.compile wrap.

    `fused` runs `FusedELBO` (bf16: bfloat16 matmuls); otherwise autograd, under bf16 autocast
    for `bf16`, with the loss always in float32. `precision` may be `auto` (see `precision.py`).
    """

    def __init__(self, vae: VAE, precision: str, fused: bool) -> None:
        super().__init__()
        self.vae, self.fused = vae, fused
        self.precision = resolve_precision(precision, next(vae.parameters()).device)

    def forward(self, x: Tensor, eps: Tensor) -> Tensor:
        if self.fused:
            return fused_elbo(self.vae, x, eps, torch.bfloat16 if self.precision == "bf16" else None)
        with _autocast(x.device, self.precision):
            logits, mu, log_std = self.vae(x, eps)
        wide = torch.promote_types(logits.dtype, torch.float32)  # bf16 -> float32; float64 stays float64
        recon = self.vae.likelihood.recon_loss(logits.to(wide), x).sum()
        return torch.stack([recon, kl_divergence(mu.to(wide), log_std.to(wide)).sum()])


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def batch_losses(model: VAE, x: Tensor, eps: Tensor, likelihood: str, precision: str) -> tuple[Tensor, Tensor]:
    """Per-batch summed (recon, kl) by autograd's path: the reference the fused step is tested against."""
    assert likelihood == model.config.likelihood
    recon, kl = ELBOSums(model, precision, fused=False)(x, eps)
    return recon, kl


class Stepper:
    """zero_grad, forward, backward, Adam: eagerly, or replayed as one CUDA graph for full batches.

    The graph records the very same `step` that runs eagerly (and on the CPU), on static input buffers.
    """

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, cuda_graphs: bool) -> None:
        self.module, self.optimizer, self.cuda_graphs = module, optimizer, cuda_graphs
        self.graph = None
        self.full_steps = 0
        self.static: tuple[Tensor, Tensor, Tensor] | None = None
        self.static_parts: Tensor | None = None

    def step(self, x: Tensor, eps: Tensor, coef: Tensor) -> Tensor:
        """One optimiser step on the loss coef . (recon, kl); returns the detached (recon, kl) sums."""
        self.optimizer.zero_grad(set_to_none=True)
        parts = self.module(x, eps)
        parts.backward(coef)
        self.optimizer.step()
        return parts.detach()

    def __call__(self, x: Tensor, eps: Tensor, coef: Tensor, full: bool) -> Tensor:
        if not (self.cuda_graphs and full):
            return self.step(x, eps, coef)
        if self.static is None:
            self.static = (x.clone(), eps.clone(), coef.clone())
        for buf, value in zip(self.static, (x, eps, coef)):
            buf.copy_(value)
        if self.graph is not None:
            self.graph.replay()
            return self.static_parts
        self.full_steps += 1
        if self.full_steps <= GRAPH_WARMUP:  # on a side stream, as CUDA graph capture requires
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                parts = self.step(*self.static)
            torch.cuda.current_stream().wait_stream(side)
            return parts
        self.optimizer.zero_grad(set_to_none=True)  # grads are then allocated from the graph's pool
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            parts = self.module(self.static[0], self.static[1])
            parts.backward(self.static[2])
            self.optimizer.step()
            self.static_parts = parts.detach()
        self.graph.replay()
        return self.static_parts


def build_stepper(model: VAE, optimizer: torch.optim.Optimizer, cfg: TrainParams, world: Single) -> Stepper:
    """The step for these params: fused or autograd, float32 or bf16, compiled or not, DDP-wrapped under a group."""
    device = next(model.parameters()).device
    sums = ELBOSums(model, cfg.precision, cfg.fused and not cfg.compile)
    if cfg.precision == "auto" and world.is_main:
        log.info("train.precision auto: %s on %s", sums.precision, device.type)
    module: nn.Module = sums
    if world.active:
        from torch.nn.parallel import DistributedDataParallel as DDP

        module = DDP(module, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        module = torch.compile(module)
    graphs = cfg.cuda_graphs and device.type == "cuda" and not world.active and not cfg.compile
    if cfg.cuda_graphs and not graphs:
        log.info("train.cuda_graphs ignored: it needs a CUDA device, one process and compile: false")
    return Stepper(module, optimizer, graphs)
