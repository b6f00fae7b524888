"""The training loop: tensors in, history out.

It knows nothing of MLflow, DVC or Prefect: the caller passes `on_epoch`, which
checkpoints and logs. The whole split lives in one tensor on the device. Each
epoch gathers it once in a seeded order, draws the epoch's noise in one call
and slices batches; every step writes its (recon, kl) sums into a device
buffer that is read once at the end of the epoch, so there is no host sync per
step on a GPU and the NaN check still names the batch.

The step itself (the fused ELBO, bf16, CUDA graphs) is `step.py`'s `Stepper`.
Under DDP each rank takes its block of every global batch (see `shard_plan`).
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn
from tqdm import tqdm

from vae_mlops import binarize as binarisation
from vae_mlops.denormals import flushed_denormals
from vae_mlops.distributed import Single
from vae_mlops.errors import VaeMlopsError
from vae_mlops.model import VAE, config_from_params
from vae_mlops.params import Params, TrainParams
from vae_mlops.progress import eta_note
from vae_mlops.step import ELBOSums, Stepper, build_stepper

log = logging.getLogger(__name__)

VAL_CHUNK = 1000  # validation images per forward pass


class TrainingDiverged(VaeMlopsError):
    """The loss became NaN or inf: names the epoch and the first bad batch."""


class DeviceError(VaeMlopsError):
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
    shuffled: Tensor | None = field(default=None, repr=False)  # the epoch's gathered images, reused (not saved)

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
    """Adam with its fused kernel: one pass over all parameters, float32 master weights in every precision."""
    return torch.optim.Adam(model.parameters(), lr=lr, fused=True, capturable=capturable)


def build_state(params: Params, device: torch.device) -> TrainState:
    """A fresh model, optimiser and noise generator, all seeded by `train.seed`."""
    torch.manual_seed(params.train.seed)
    config = config_from_params(params.model)
    model = VAE(config).to(device)
    noise = torch.Generator(device=device).manual_seed(params.train.seed)  # the same on every rank
    capturable = params.train.cuda_graphs and device.type == "cuda"
    return TrainState(model, make_optimizer(model, params.train.lr, device, capturable), noise)


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


# ---------------------------------------------------------------- epochs


def evaluate_loss(
    model: VAE, x: Tensor, cfg: TrainParams, likelihood: str, epoch: int, world: Single = Single()
) -> tuple[float, float]:
    """Mean (recon, kl) per image on held-out data, with noise seeded by (seed, epoch); ranks share the work."""
    assert likelihood == model.config.likelihood
    recon, kl = validation_means(model, x, cfg, epoch, world).tolist()
    return recon, kl


@torch.no_grad()
def validation_means(model: VAE, x: Tensor, cfg: TrainParams, epoch: int, world: Single = Single()) -> Tensor:
    """`evaluate_loss` as a device tensor (recon, kl): `fit` reads it with the epoch's other numbers, at once."""
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
    return world.all_reduce(sums) / len(x)


def _block(n: int, world: Single) -> tuple[int, int]:
    q, r = divmod(n, world.world_size)
    lo = world.rank * q + min(world.rank, r)
    return lo, lo + q + (world.rank < r)


class _Progress:
    """tqdm bar on a terminal; one line per epoch otherwise (logs, CI, DVC)."""

    def __init__(self, total_batches: int, epoch: int, epochs: int, show: bool) -> None:
        self.bar = None
        if show and sys.stderr.isatty():

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
    binarize: str = binarisation.NONE,
) -> Tensor:
    """One epoch over `x_train`; returns device means (loss, recon, kl) and the first bad batch (or -1).

    `binarize` (`data.binarize`): `dynamic` trains on a fresh Bernoulli draw of the split this epoch.
    """
    assert likelihood == state.model.config.likelihood
    stepper = stepper or build_stepper(state.model, state.optimizer, cfg, world)
    epoch = state.epoch + 1
    n, latent, device = len(x_train), state.model.config.latent_dim, x_train.device
    plan = shard_plan(n, cfg.batch_size, world.world_size, world.rank)
    eps_all = torch.randn((n, latent), generator=state.noise, device=device)  # every rank draws the global noise
    order = epoch_permutation(n, cfg.seed, epoch, device)
    x_train = binarisation.epoch_images(x_train, binarize, cfg.seed, epoch)
    if world.world_size == 1:
        xs, eps = gather(state, x_train, order), eps_all  # one gather, then contiguous slices
    else:
        positions = plan.positions.to(device)
        xs, eps = gather(state, x_train, order[positions]), eps_all[positions]
    coefs: dict[int, Tensor] = {}  # loss = coef . (recon, kl); DDP averages over ranks, hence world_size
    steps = len(plan.local_sizes)
    parts_log = torch.empty((steps, 2), device=device)  # (recon, kl) sums of every step, read once
    progress = _Progress(steps, epoch, epochs, world.is_main)
    state.model.train()
    i = 0
    with flushed_denormals():  # Adam's state of weights without gradient decays into them (see denormals.py)
        for b, (size, total) in enumerate(zip(plan.local_sizes, plan.global_sizes)):
            if total not in coefs:
                scale = world.world_size / total
                coefs[total] = torch.tensor([scale, cfg.beta * scale], device=device)
            parts_log[b] = stepper(xs[i : i + size], eps[i : i + size], coefs[total], full=size == cfg.batch_size)
            i += size
            progress.update(lambda: (parts_log[: b + 1] @ torch.tensor([1.0, cfg.beta], device=device)).item() / i)
    progress.close()
    return _epoch_summary(parts_log, n, cfg.beta, world)


def gather(state: TrainState, x: Tensor, index: Tensor) -> Tensor:
    """x[index] written into the buffer of the previous epoch: the same rows, without a fresh allocation.

    A new (N, D) tensor every epoch costs the kernel a page fault per 4 kB of it on the CPU, a
    large share of the gather's time; the buffer is made once and overwritten every epoch.
    """
    shape = (len(index), *x.shape[1:])
    buf = state.shuffled
    if buf is None or buf.shape != shape or buf.dtype != x.dtype or buf.device != x.device:
        buf = state.shuffled = torch.empty(shape, dtype=x.dtype, device=x.device)
    return torch.index_select(x, 0, index, out=buf)


def _epoch_summary(parts_log: Tensor, n: int, beta: float, world: Single) -> Tensor:
    """(loss, recon, kl) per image over all ranks, and the first step whose sums are not finite (-1: none)."""
    steps = len(parts_log)
    recon, kl = parts_log.sum(0)
    sums = world.all_reduce(torch.stack([recon + beta * kl, recon, kl]))
    ok = torch.isfinite(parts_log).all(1)
    first_bad = torch.where(ok, steps, torch.arange(steps, device=parts_log.device)).min()
    first_bad = world.all_reduce(first_bad.view(1).float(), op="min")
    return torch.cat([sums / n, torch.where(first_bad < steps, first_bad, -1.0)])


def progress_note(epoch: int, epochs: int, done_here: int, seconds_here: float) -> str:
    """'epoch 3/100 (3%), 0:00:12 so far, about 0:06:28 left', from the mean of this process's `done_here` epochs."""
    return "epoch " + eta_note(epoch, epochs, seconds_here, "", done_timed=done_here)


def learning_rate(cfg: TrainParams, epoch: int) -> float:
    """Step decay: `lr` times `lr_decay` for every `lr_decay_epochs` epochs finished before `epoch` (1-based)."""
    return cfg.lr * cfg.lr_decay ** ((epoch - 1) // cfg.lr_decay_epochs)


def fit(
    state: TrainState,
    x_train: Tensor,
    x_val: Tensor,
    cfg: TrainParams,
    likelihood: str,
    on_epoch: Callable[[EpochStats, TrainState], None] = lambda stats, state: None,
    world: Single = Single(),
    binarize: str = binarisation.NONE,
) -> list[dict]:
    """Train from `state.epoch` to `cfg.epochs`, calling `on_epoch` after each finished epoch.

    Raises `TrainingDiverged` before `on_epoch` when the loss is not finite, so
    the last checkpoint written stays the last good one. Under DDP every rank
    calls `fit`; `world` tells the loop its rank. `binarize` is `data.binarize` (`x_val` comes drawn already).
    """
    stepper = build_stepper(state.model, state.optimizer, cfg, world)
    while state.epoch < cfg.epochs:
        t0 = time.perf_counter()
        epoch = state.epoch + 1
        for group in state.optimizer.param_groups:  # a function of the epoch alone: a resumed run gets the same
            group["lr"] = learning_rate(cfg, epoch)
        summary = train_epoch(state, x_train, cfg, likelihood, cfg.epochs, stepper, world, binarize)
        val = validation_means(state.model, x_val, cfg, epoch, world)  # queued before any read: one sync per epoch
        loss, recon, kl, bad, val_recon, val_kl = torch.cat([summary, val]).tolist()
        if bad >= 0:
            raise TrainingDiverged(
                f"loss became NaN/inf at epoch {epoch}, batch {int(bad)} (train.lr={cfg.lr}); "
                "lower train.lr or check the data. The last good checkpoint is kept; nothing was evaluated."
            )
        stats = EpochStats(
            epoch, loss, recon, kl, val_recon + cfg.beta * val_kl, val_recon, val_kl, time.perf_counter() - t0
        )
        state.epoch = epoch
        state.history.append(stats.to_dict())
        on_epoch(stats, state)
    return state.history
