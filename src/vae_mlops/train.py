"""The training loop: tensors in, history out.

It knows nothing of MLflow, DVC or Prefect: the caller passes `on_epoch`, which
checkpoints and logs. The whole split lives in one tensor on the device. Each
epoch gathers it once in a seeded order, draws the epoch's noise in one call
and slices batches; every step writes its (recon, kl) sums into a device
buffer that is read once at the end of the epoch, so there is no host sync per
step on a GPU and the NaN check still names the batch.

In float32 the step runs `FusedELBO`: the forward pass and a hand-written
backward pass of the same ELBO (Kingma & Welling 2014), with no autograd graph
to record (about 56 ops a step against autograd's 60). bf16 autocast and torch.compile go through autograd.
Under DDP each rank takes its block of every global batch (see `shard_plan`).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from vae_mlops.distributed import Single
from vae_mlops.model import VAE, kl_divergence, recon_loss, softplus
from vae_mlops.params import TrainParams

log = logging.getLogger(__name__)

VAL_CHUNK = 1000  # validation images per forward pass
GRAPH_WARMUP = 3  # eager steps before a CUDA graph is captured (initialises Adam's state)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf: names the epoch and the first bad batch."""


class DeviceError(RuntimeError):
    """The requested device is not available on this machine."""


@dataclass(frozen=True)
class EpochStats:
    epoch: int
    train_loss: float
    train_recon: float
    train_kl: float
    val_loss: float
    val_recon: float
    val_kl: float
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainState:
    """Everything that a resumed run needs to continue bit-for-bit."""

    model: VAE
    optimizer: torch.optim.Optimizer
    noise: torch.Generator  # eps of the reparameterisation, drawn once per epoch
    epoch: int = 0  # completed epochs
    history: list[dict] | None = None

    def __post_init__(self) -> None:
        self.history = self.history or []


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; `cuda` without one is an error, not a silent fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("train.device is 'cuda' but no CUDA GPU is available here; set train.device: auto or cpu")
    return torch.device(name)


def make_optimizer(model: nn.Module, lr: float, device: torch.device, capturable: bool = False) -> torch.optim.Optimizer:
    """Adam with its fused kernel: one pass over all parameters (4x faster than foreach on this CPU)."""
    return torch.optim.Adam(model.parameters(), lr=lr, fused=True, capturable=capturable)


def to_unit_float(images: Tensor, device: torch.device) -> Tensor:
    """uint8 (N, 784) -> float32 on [0, 1] on the device, once for the whole split."""
    return images.to(device).float().div_(255.0)


def split_train_val(n: int, val_size: int, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded hold-out: indices of the training and validation images."""
    if not 0 < val_size < n:
        raise ValueError(f"train.val_size={val_size} must be between 1 and {n - 1} for {n} training images")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


def epoch_permutation(n: int, seed: int, epoch: int, device: torch.device) -> Tensor:
    """The order of epoch `epoch`: a function of (seed, epoch) alone, so resume needs no RNG replay."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).to(device)


# ---------------------------------------------------------------- the ELBO's sums and gradients


def _recon_sum(logits: Tensor, x: Tensor, likelihood: str) -> Tensor:
    """Summed reconstruction term, the same maths as `model.recon_loss` in fewer kernels.

    bernoulli: BCE-with-logits = softplus(l) - x * l, summed; gaussian: sum (sigmoid(l) - x)^2.
    """
    if likelihood == "bernoulli":
        return softplus(logits).sum() - torch.dot(logits.reshape(-1), x.reshape(-1))
    if likelihood == "gaussian":
        return (torch.sigmoid(logits) - x).pow(2).sum()
    raise ValueError(f"unknown likelihood {likelihood!r}")


class FusedELBO(torch.autograd.Function):
    """(recon, kl) sums of a batch with a hand-written backward pass; float32, same maths as autograd.

    The network is `model.VAE`'s: h1 = relu(x W1' + b1); mu, log_std = h1 Wm' + bm, h1 Ws' + bs;
    z = mu + eps * exp(log_std); logits = relu(z W3' + b3) W4' + b4.
    """

    @staticmethod
    def forward(ctx, x, eps, likelihood, w1, b1, wm, bm, ws, bs, w3, b3, w4, b4):  # noqa: PLR0913
        h1 = torch.addmm(b1, x, w1.t()).relu_()  # (B, H)
        mu = torch.addmm(bm, h1, wm.t())  # (B, L)
        log_std = torch.addmm(bs, h1, ws.t())
        std = log_std.exp()
        z = torch.addcmul(mu, eps, std)
        h3 = torch.addmm(b3, z, w3.t()).relu_()  # (B, H)
        logits = torch.addmm(b4, h3, w4.t())  # (B, D)
        recon = _recon_sum(logits, x, likelihood)
        kl = 0.5 * (mu.square() + std.square() - 1 - 2 * log_std).sum()  # Kingma & Welling 2014, App. B
        ctx.likelihood = likelihood
        ctx.save_for_backward(x, eps, h1, mu, std, z, h3, logits, wm, ws, w3, w4)
        return torch.stack([recon, kl])

    @staticmethod
    def backward(ctx, grad_parts):
        x, eps, h1, mu, std, z, h3, logits, wm, ws, w3, w4 = ctx.saved_tensors
        g_recon, g_kl = grad_parts[0], grad_parts[1]
        p = torch.sigmoid(logits)
        if ctx.likelihood == "bernoulli":
            d_logits = p.sub_(x).mul_(g_recon)  # d/dl softplus(l) - x l = sigmoid(l) - x
        else:
            d_logits = (p - x).mul_(p).mul_(1 - p).mul_(2 * g_recon)
        d_h3 = torch.ops.aten.threshold_backward(torch.mm(d_logits, w4), h3, 0)
        d_z = torch.mm(d_h3, w3)
        d_mu = torch.addcmul(d_z, mu, g_kl)  # KL: d/dmu = mu
        d_log_std = d_z.mul_(eps).mul_(std).addcmul_(std.square().sub_(1), g_kl)  # KL: d/dlog_std = std^2 - 1
        d_h1 = torch.mm(d_mu, wm).addmm_(d_log_std, ws)
        d_h1 = torch.ops.aten.threshold_backward(d_h1, h1, 0)
        return (
            None, None, None,
            torch.mm(d_h1.t(), x), d_h1.sum(0),
            torch.mm(d_mu.t(), h1), d_mu.sum(0),
            torch.mm(d_log_std.t(), h1), d_log_std.sum(0),
            torch.mm(d_h3.t(), z), d_h3.sum(0),
            torch.mm(d_logits.t(), h3), d_logits.sum(0),
        )  # fmt: skip


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class ELBOSums(nn.Module):
    """Module form of a batch's (recon, kl) sums, shape (2,): what DDP and torch.compile wrap.

    `fused` (float32 only) runs `FusedELBO`; otherwise autograd, optionally under
    bf16 autocast, with the loss always in float32.
    """

    def __init__(self, vae: VAE, precision: str, fused: bool) -> None:
        super().__init__()
        self.vae, self.precision = vae, precision
        self.fused = fused and precision == "float32"

    def forward(self, x: Tensor, eps: Tensor) -> Tensor:
        m = self.vae
        if self.fused:
            return FusedELBO.apply(
                x, eps, m.config.likelihood, m.fc1.weight, m.fc1.bias, m.fc_mu.weight, m.fc_mu.bias,
                m.fc_log_std.weight, m.fc_log_std.bias, m.fc3.weight, m.fc3.bias, m.fc4.weight, m.fc4.bias,
            )  # fmt: skip
        with _autocast(x.device, self.precision):
            logits, mu, log_std = m(x, eps)
        wide = torch.promote_types(logits.dtype, torch.float32)  # bf16 -> float32; float64 stays float64
        recon = recon_loss(logits.to(wide), x, m.config.likelihood).sum()
        return torch.stack([recon, kl_divergence(mu.to(wide), log_std.to(wide)).sum()])


def batch_losses(model: VAE, x: Tensor, eps: Tensor, likelihood: str, precision: str) -> tuple[Tensor, Tensor]:
    """Per-batch summed (recon, kl) by autograd's path: the reference the fused step is tested against."""
    assert likelihood == model.config.likelihood
    recon, kl = ELBOSums(model, precision, fused=False)(x, eps)
    return recon, kl


# ---------------------------------------------------------------- sharding


@dataclass(frozen=True)
class ShardPlan:
    """This rank's part of one epoch: positions in the epoch's order, and the batch sizes."""

    positions: Tensor  # (n_local,) indices into the epoch permutation, batch after batch
    local_sizes: list[int]  # images this rank takes at each step
    global_sizes: list[int]  # images all ranks take together at each step


def shard_plan(n: int, batch_size: int, world_size: int, rank: int) -> ShardPlan:
    """Step s takes the global batch order[s*G : (s+1)*G], G = batch_size * world_size; rank r takes its block.

    The blocks of the last, short global batch are split as evenly as `torch.tensor_split` would, so a
    run on W ranks sees exactly the batches of a one-process run with batch G.
    """
    g = batch_size * world_size
    full, rest = divmod(n, g)
    starts = torch.arange(full) * g + rank * batch_size
    positions = [(starts[:, None] + torch.arange(batch_size)[None, :]).reshape(-1)]
    local_sizes, global_sizes = [batch_size] * full, [g] * full
    if rest:
        q, r = divmod(rest, world_size)
        size, offset = q + (rank < r), full * g + rank * q + min(rank, r)
        positions.append(torch.arange(offset, offset + size))
        local_sizes.append(size)
        global_sizes.append(rest)
    return ShardPlan(torch.cat(positions), local_sizes, global_sizes)


# ---------------------------------------------------------------- one step


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


def build_stepper(state: TrainState, cfg: TrainParams, world: Single) -> Stepper:
    """The step for these params: fused or autograd, compiled or not, DDP-wrapped under a process group."""
    device = next(state.model.parameters()).device
    module: nn.Module = ELBOSums(state.model, cfg.precision, cfg.fused and not cfg.compile)
    if world.active:
        from torch.nn.parallel import DistributedDataParallel as DDP

        module = DDP(module, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        module = torch.compile(module)
    graphs = cfg.cuda_graphs and device.type == "cuda" and not world.active and not cfg.compile
    if cfg.cuda_graphs and not graphs:
        log.info("train.cuda_graphs ignored: it needs a CUDA device, one process and compile: false")
    return Stepper(module, state.optimizer, graphs)


# ---------------------------------------------------------------- epochs


@torch.no_grad()
def evaluate_loss(
    model: VAE, x: Tensor, cfg: TrainParams, likelihood: str, epoch: int, world: Single = Single()
) -> tuple[float, float]:
    """Mean (recon, kl) per image on held-out data, with noise seeded by (seed, epoch); ranks share the work."""
    assert likelihood == model.config.likelihood
    was_training = model.training
    model.eval()
    g = torch.Generator(device=x.device).manual_seed(cfg.seed + 7919 * epoch)
    eps = torch.randn((len(x), model.config.latent_dim), generator=g, device=x.device)
    sums_of = ELBOSums(model, cfg.precision, cfg.fused)
    lo, hi = _block(len(x), world)
    sums = torch.zeros(2, device=x.device)
    for i in range(lo, hi, VAL_CHUNK):
        j = min(i + VAL_CHUNK, hi)
        sums += sums_of(x[i:j], eps[i:j])
    model.train(was_training)
    recon, kl = (world.all_reduce(sums) / len(x)).tolist()
    return recon, kl


def _block(n: int, world: Single) -> tuple[int, int]:
    q, r = divmod(n, world.world_size)
    lo = world.rank * q + min(world.rank, r)
    return lo, lo + q + (world.rank < r)


class _Progress:
    """tqdm bar on a terminal; one line per epoch otherwise (logs, CI, DVC)."""

    def __init__(self, total_batches: int, epoch: int, epochs: int, show: bool) -> None:
        self.bar = None
        if show and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_batches, desc=f"epoch {epoch}/{epochs}", leave=False, unit="batch")

    def update(self, loss: Callable[[], float]) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if self.bar.n % 20 == 0:
                self.bar.set_postfix(loss=f"{loss():.2f}")  # a host sync every 20 batches, on a terminal only

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train_epoch(
    state: TrainState,
    x_train: Tensor,
    cfg: TrainParams,
    likelihood: str,
    epochs: int,
    stepper: Stepper | None = None,
    world: Single = Single(),
) -> Tensor:
    """One epoch over `x_train`; returns device means (loss, recon, kl) and the first bad batch (or -1)."""
    assert likelihood == state.model.config.likelihood
    stepper = stepper or build_stepper(state, cfg, world)
    epoch = state.epoch + 1
    n, latent, device = len(x_train), state.model.config.latent_dim, x_train.device
    plan = shard_plan(n, cfg.batch_size, world.world_size, world.rank)
    eps_all = torch.randn((n, latent), generator=state.noise, device=device)  # every rank draws the global noise
    order = epoch_permutation(n, cfg.seed, epoch, device)
    if world.world_size == 1:
        xs, eps = x_train[order], eps_all  # one gather, then contiguous slices
    else:
        positions = plan.positions.to(device)
        xs, eps = x_train[order[positions]], eps_all[positions]
    coefs: dict[int, Tensor] = {}  # loss = coef . (recon, kl); DDP averages over ranks, hence world_size
    steps = len(plan.local_sizes)
    parts_log = torch.empty((steps, 2), device=device)  # (recon, kl) sums of every step, read once
    progress = _Progress(steps, epoch, epochs, world.is_main)
    state.model.train()
    i = 0
    for b, (size, total) in enumerate(zip(plan.local_sizes, plan.global_sizes)):
        if total not in coefs:
            scale = world.world_size / total
            coefs[total] = torch.tensor([scale, cfg.beta * scale], device=device)
        parts_log[b] = stepper(xs[i : i + size], eps[i : i + size], coefs[total], full=size == cfg.batch_size)
        i += size
        progress.update(lambda: (parts_log[: b + 1] @ torch.tensor([1.0, cfg.beta], device=device)).item() / i)
    progress.close()
    return _epoch_summary(parts_log, n, cfg.beta, world)


def _epoch_summary(parts_log: Tensor, n: int, beta: float, world: Single) -> Tensor:
    """(loss, recon, kl) per image over all ranks, and the first step whose sums are not finite (-1: none)."""
    steps = len(parts_log)
    recon, kl = parts_log.sum(0)
    sums = world.all_reduce(torch.stack([recon + beta * kl, recon, kl]))
    ok = torch.isfinite(parts_log).all(1)
    first_bad = torch.where(ok, steps, torch.arange(steps, device=parts_log.device)).min()
    first_bad = world.all_reduce(first_bad.view(1).float(), op="min")
    return torch.cat([sums / n, torch.where(first_bad < steps, first_bad, -1.0)])


def fit(
    state: TrainState,
    x_train: Tensor,
    x_val: Tensor,
    cfg: TrainParams,
    likelihood: str,
    on_epoch: Callable[[EpochStats, TrainState], None] = lambda stats, state: None,
    world: Single = Single(),
) -> list[dict]:
    """Train from `state.epoch` to `cfg.epochs`, calling `on_epoch` after each finished epoch.

    Raises `TrainingDiverged` before `on_epoch` when the loss is not finite, so
    the last checkpoint written stays the last good one. Under DDP every rank
    calls `fit`; `world` tells the loop its rank.
    """
    stepper = build_stepper(state, cfg, world)
    while state.epoch < cfg.epochs:
        t0 = time.perf_counter()
        loss, recon, kl, bad = train_epoch(state, x_train, cfg, likelihood, cfg.epochs, stepper, world).tolist()
        epoch = state.epoch + 1
        if bad >= 0:
            raise TrainingDiverged(
                f"loss became NaN/inf at epoch {epoch}, batch {int(bad)} (train.lr={cfg.lr}); "
                "lower train.lr or check the data. The last good checkpoint is kept; nothing was evaluated."
            )
        val_recon, val_kl = evaluate_loss(state.model, x_val, cfg, likelihood, epoch, world)
        stats = EpochStats(
            epoch, loss, recon, kl, val_recon + cfg.beta * val_kl, val_recon, val_kl, time.perf_counter() - t0
        )
        state.epoch = epoch
        state.history.append(stats.to_dict())
        on_epoch(stats, state)
    return state.history
