"""One training step: the batch's (recon, kl) sums, their gradients and Adam, eagerly or as a CUDA graph.

The fused step is the `mlp`'s ELBO (Kingma & Welling 2014) with a hand-written backward pass
(`accel.fused_elbo`, `accel.fused_grads`); in `bf16` the matmuls of its two wide layers run in bfloat16
while the weights (Adam's master copy), the likelihood, the KL and the sums stay in float32. Autograd
(`train.fused: false`, torch.compile) remains the reference the fused step is tested against, and the step
of every model the fused maths does not cover (another architecture than the `mlp`, another prior than
N(0, I): `VAEConfig.fusable`).
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from vae_mlops import accel
from vae_mlops.distributed import Single
from vae_mlops.model import VAE, reparameterize
from vae_mlops.params import TrainParams
from vae_mlops.precision import resolve_precision

log = logging.getLogger(__name__)


class ELBOSums(nn.Module):
    """Module form of a batch's (recon, kl) sums, shape (2,): what DDP and torch.compile wrap.

    `fused` runs `accel.fused_elbo` (bf16: bfloat16 matmuls) where the model is `fusable`; otherwise autograd,
    under bf16 autocast for `bf16`, with the loss always in float32. `precision` may be `auto` (see `precision.py`).
    """

    def __init__(self, vae: VAE, precision: str, fused: bool) -> None:
        super().__init__()
        self.vae, self.fused = vae, fused and vae.config.fusable
        self.precision = resolve_precision(precision, next(vae.parameters()).device)
        self.mm_dtype = torch.bfloat16 if self.precision == "bf16" else None  # None: the weights' own dtype
        # looked up once: the same tensors the optimiser holds (a model whose parameters are replaced needs
        # a new ELBOSums, as it needs a new optimiser); the lookup by name costs a share of a small step
        self.params = vae.fused_params() if self.fused else []

    def step_grads(self, x: Tensor, eps: Tensor, coef: Tensor) -> Tensor:
        """The fused step without autograd: returns the (recon, kl) sums and sets every `.grad` to d(coef . sums)."""
        assert self.fused, "step_grads is the fused step's"
        return accel.fused_grads(self.params, x, eps, self.vae.likelihood, self.mm_dtype, coef)

    def forward(self, x: Tensor, eps: Tensor) -> Tensor:
        if self.fused:
            return accel.fused_elbo(self.params, x, eps, self.vae.likelihood, self.mm_dtype)
        with _autocast(x.device, self.precision):
            mu, log_std = self.vae.encode(x)
            z = reparameterize(mu, log_std, eps)
            logits = self.vae.decode_logits(z)
        wide = torch.promote_types(logits.dtype, torch.float32)  # bf16 -> float32; float64 stays float64
        recon = self.vae.likelihood.recon_loss(logits.to(wide), x).sum()
        kl = self.vae.prior.kl(mu.to(wide), log_std.to(wide), z.to(wide)).sum()
        return torch.stack([recon, kl])


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

    The graph (`accel.CudaGraphStep`) records the very same `step` that runs eagerly (and on the CPU).
    The fused step outside DDP, torch.compile and CUDA graphs skips autograd (`ELBOSums.step_grads`):
    same kernels, same results.
    """

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, cuda_graphs: bool) -> None:
        self.module, self.optimizer, self.cuda_graphs = module, optimizer, cuda_graphs
        self.direct = isinstance(module, ELBOSums) and module.fused and not cuda_graphs
        self.graph = accel.CudaGraphStep(self.step) if cuda_graphs else None

    def step(self, x: Tensor, eps: Tensor, coef: Tensor) -> Tensor:
        """One optimiser step on the loss coef . (recon, kl); returns the detached (recon, kl) sums."""
        if self.direct:
            parts = self.module.step_grads(x, eps, coef)
            self.optimizer.step()
            return parts
        self.optimizer.zero_grad(set_to_none=True)  # under a graph's capture: grads come from the graph's pool
        parts = self.module(x, eps)
        parts.backward(coef)
        self.optimizer.step()
        return parts.detach()

    def __call__(self, x: Tensor, eps: Tensor, coef: Tensor, full: bool) -> Tensor:
        if self.graph is None or not full:
            return self.step(x, eps, coef)
        return self.graph(x, eps, coef)


def build_stepper(model: VAE, optimizer: torch.optim.Optimizer, cfg: TrainParams, world: Single) -> Stepper:
    """The step for these params: fused or autograd, float32 or bf16, compiled or not, DDP-wrapped under a group."""
    device = next(model.parameters()).device
    sums = ELBOSums(model, cfg.precision, cfg.fused and not cfg.compile)
    if cfg.precision == "auto" and world.is_main:
        log.info("train.precision auto: %s on %s", sums.precision, device.type)
    module: nn.Module = sums
    if world.active:
        module = DDP(module, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        module = torch.compile(module)
    graphs = cfg.cuda_graphs and device.type == "cuda" and not world.active and not cfg.compile
    if cfg.cuda_graphs and not graphs:
        log.info("train.cuda_graphs ignored: it needs a CUDA device, one process and compile: false")
    return Stepper(module, optimizer, graphs)
