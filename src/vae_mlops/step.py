"""One training step: the batch's (recon, kl) sums, their gradients and Adam, eagerly or as a CUDA graph.

`FusedELBO` is the forward pass and a hand-written backward pass of the ELBO (Kingma &
Welling 2014) with no autograd graph to record; the likelihood supplies the reconstruction
sum and its gradient in the logits. In `bf16` the matmuls of its two wide layers run in
bfloat16 while the weights (Adam's master copy), the likelihood, the KL and the sums stay in
float32: the casts are written out, so no autocast dispatch runs. Autograd (`train.fused: false`, torch.compile)
remains the reference the fused step is tested against, and the step of every model the fused maths does not
cover (another architecture than the `mlp`, another prior than N(0, I): `VAEConfig.fusable`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim import optimizer as opt_mod

from vae_mlops.distributed import Single
from vae_mlops.likelihoods import Likelihood
from vae_mlops.model import VAE, reparameterize
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


def elbo_forward(
    x: Tensor, eps: Tensor, likelihood: Likelihood, mm_dtype: torch.dtype, params: Sequence[Tensor]
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """`FusedELBO`'s forward as a function: (recon, kl) sums, shape (2,), and what the backward needs."""
    w1, b1, wm, bm, ws, bs, w3, b3, w4, b4 = params  # PARAMS order
    wide = w1.dtype
    low = (lambda t: t) if mm_dtype == wide else (lambda t: t.to(mm_dtype))  # noqa: E731
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
    """`FusedELBO`'s backward as a function: the gradients of g_recon * recon + g_kl * kl, in PARAMS order."""
    x, x_low, eps, h1, mu, std, z, h3, logits, wm, ws, w3, w4 = saved
    wide = h1.dtype
    low = (lambda t: t) if mm_dtype == wide else (lambda t: t.to(mm_dtype))  # noqa: E731
    d_logits = likelihood.recon_grad(logits, x, g_recon)  # (B, D)
    d_logits_low = low(d_logits)
    d_h3 = torch.ops.aten.threshold_backward(torch.mm(d_logits_low, w4), h3, 0).to(wide)
    d_z = torch.mm(d_h3, w3)
    d_mu = torch.addcmul(d_z, mu, g_kl)  # KL: d/dmu = mu
    d_log_std = d_z.mul_(eps).mul_(std).addcmul_(std.square().sub_(1), g_kl)  # KL: d/dlog_std = std^2 - 1
    d_h1 = torch.mm(d_mu, wm).addmm_(d_log_std, ws)
    d_h1 = torch.ops.aten.threshold_backward(d_h1, h1, 0)
    return (
        torch.mm(low(d_h1).t(), x_low).to(wide), d_h1.sum(0),
        torch.mm(d_mu.t(), h1), d_mu.sum(0),
        torch.mm(d_log_std.t(), h1), d_log_std.sum(0),
        torch.mm(d_h3.t(), z), d_h3.sum(0),
        torch.mm(d_logits_low.t(), h3).to(wide), d_logits.sum(0),
    )  # fmt: skip


class FusedELBO(torch.autograd.Function):
    """(recon, kl) sums of a batch with a hand-written backward pass; same maths as autograd.

    Inputs after (x, eps, likelihood, mm_dtype) are the tensors named by `PARAMS`. The network is
    `model.VAE`'s: h1 = relu(x W1' + b1); mu, log_std = h1 Wm' + bm, h1 Ws' + bs;
    z = mu + eps * exp(log_std); logits = relu(z W3' + b3) W4' + b4. The matmuls of the two wide
    layers, fc1 and fc4 (98% of the FLOPs), run in `mm_dtype` (the weights' own dtype, or bfloat16);
    the narrow ones (fc_mu, fc_log_std, fc3), where bf16 saves nothing, the likelihood, the KL and
    every gradient returned stay in the weights' dtype. `elbo_forward` and `elbo_backward` are the
    two halves; `ELBOSums.step_grads` calls them without autograd.
    """

    @staticmethod
    def forward(ctx, x, eps, likelihood: Likelihood, mm_dtype: torch.dtype, *params):  # noqa: PLR0913
        parts, saved = elbo_forward(x, eps, likelihood, mm_dtype, params)
        ctx.likelihood, ctx.mm_dtype = likelihood, mm_dtype
        ctx.save_for_backward(*saved)
        return parts

    @staticmethod
    def backward(ctx, grad_parts):
        grads = elbo_backward(ctx.saved_tensors, ctx.likelihood, ctx.mm_dtype, grad_parts[0], grad_parts[1])
        return (None, None, None, None, *grads)


def fused_elbo(model: VAE, x: Tensor, eps: Tensor, mm_dtype: torch.dtype | None = None) -> Tensor:
    """`FusedELBO` on `model`'s own weights: (recon, kl) sums, shape (2,)."""
    params = layer_params(model)
    return FusedELBO.apply(x, eps, model.likelihood, mm_dtype or params[0].dtype, *params)


class ELBOSums(nn.Module):
    """Module form of a batch's (recon, kl) sums, shape (2,): what DDP and torch.compile wrap.

    `fused` runs `FusedELBO` (bf16: bfloat16 matmuls) where the model is `fusable`; otherwise autograd,
    under bf16 autocast for `bf16`, with the loss always in float32. `precision` may be `auto` (see `precision.py`).
    """

    def __init__(self, vae: VAE, precision: str, fused: bool) -> None:
        super().__init__()
        self.vae, self.fused = vae, fused and vae.config.fusable
        self.precision = resolve_precision(precision, next(vae.parameters()).device)
        self.mm_dtype = torch.bfloat16 if self.precision == "bf16" else None  # None: the weights' own dtype
        # looked up once: the same tensors the optimiser holds (a model whose parameters are replaced needs
        # a new ELBOSums, as it needs a new optimiser); the lookup by name costs a share of a small step
        self.params = layer_params(vae) if self.fused else []

    def step_grads(self, x: Tensor, eps: Tensor, coef: Tensor) -> Tensor:
        """The fused step without autograd: returns the (recon, kl) sums and sets every `.grad` to d(coef . sums).

        The same two functions `FusedELBO` runs, called directly: no graph is recorded and no
        engine runs, which on a CPU is a measurable share of a step at batch 128.
        """
        assert self.fused, "step_grads is the fused step's"
        params = self.params
        mm_dtype = self.mm_dtype or params[0].dtype
        with torch.no_grad():
            parts, saved = elbo_forward(x, eps, self.vae.likelihood, mm_dtype, params)
            grads = elbo_backward(saved, self.vae.likelihood, mm_dtype, coef[0], coef[1])
        for p, g in zip(params, grads):
            p.grad = g
        return parts

    def forward(self, x: Tensor, eps: Tensor) -> Tensor:
        if self.fused:
            return fused_elbo(self.vae, x, eps, self.mm_dtype)
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


def adam_step(optimizer: torch.optim.Optimizer) -> None:
    """`optimizer.step()` for `make_optimizer`'s Adam: the same fused kernel on the same state, less Python.

    `torch.optim.Adam.step` rebuilds its lists, groups the tensors by device and checks its
    options on every call; with one parameter group of fused, non-capturable Adam and no step
    hooks, that is two calls (`_foreach_add_` on the steps, `_fused_adam_`), as torch makes them.
    Anything else, and the first step (which creates the state), goes through `optimizer.step()`.
    """
    groups = optimizer.param_groups
    group = groups[0]
    params = group["params"]
    if not _fast_adam(optimizer) or any(p.grad is None or not optimizer.state[p] for p in params):
        optimizer.step()
        return
    states = [optimizer.state[p] for p in params]
    steps = [st["step"] for st in states]
    beta1, beta2 = group["betas"]
    torch._foreach_add_(steps, 1)
    torch._fused_adam_(
        params, [p.grad for p in params], [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states],
        [], steps, amsgrad=False, lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
        eps=group["eps"], maximize=group["maximize"], grad_scale=None, found_inf=None,
    )  # fmt: skip


def _fast_adam(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `adam_step` may call the kernel itself: exactly the case `make_optimizer` builds."""
    if type(optimizer) is not torch.optim.Adam or len(optimizer.param_groups) != 1:
        return False
    g = optimizer.param_groups[0]
    plain = g["fused"] and not (g["amsgrad"] or g["capturable"] or g["differentiable"] or g["decoupled_weight_decay"])
    hooks = optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks
    global_hooks = opt_mod._global_optimizer_pre_hooks or opt_mod._global_optimizer_post_hooks
    dtypes = {(p.device, p.dtype) for p in g["params"]}
    cpu_float = len(dtypes) == 1 and next(iter(dtypes))[0].type == "cpu"
    scaled = getattr(optimizer, "grad_scale", None) is not None or getattr(optimizer, "found_inf", None) is not None
    return bool(plain and not hooks and not global_hooks and not scaled and cpu_float and not torch.is_tensor(g["lr"]))


class Stepper:
    """zero_grad, forward, backward, Adam: eagerly, or replayed as one CUDA graph for full batches.

    The graph records the very same `step` that runs eagerly (and on the CPU), on static input buffers.
    The fused step outside DDP, torch.compile and CUDA graphs skips autograd (`ELBOSums.step_grads`)
    and torch's per-call Python around Adam's fused kernel (`adam_step`): same kernels, same results.
    """

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, cuda_graphs: bool) -> None:
        self.module, self.optimizer, self.cuda_graphs = module, optimizer, cuda_graphs
        self.direct = isinstance(module, ELBOSums) and module.fused and not cuda_graphs
        self.graph = None
        self.full_steps = 0
        self.static: tuple[Tensor, Tensor, Tensor] | None = None
        self.static_parts: Tensor | None = None

    def step(self, x: Tensor, eps: Tensor, coef: Tensor) -> Tensor:
        """One optimiser step on the loss coef . (recon, kl); returns the detached (recon, kl) sums."""
        if self.direct:
            parts = self.module.step_grads(x, eps, coef)
            adam_step(self.optimizer)
            return parts
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
        module = DDP(module, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        module = torch.compile(module)
    graphs = cfg.cuda_graphs and device.type == "cuda" and not world.active and not cfg.compile
    if cfg.cuda_graphs and not graphs:
        log.info("train.cuda_graphs ignored: it needs a CUDA device, one process and compile: false")
    return Stepper(module, optimizer, graphs)
