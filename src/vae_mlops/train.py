"""The training loop: tensors in, history out.

It knows nothing of MLflow, DVC or Prefect: the caller passes `on_epoch`, which
checkpoints and logs. The whole split lives in one tensor on the device; each
epoch gathers it once in a seeded order and slices batches, and the per-batch
sums stay on the device until the end of the epoch (one host sync per epoch).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import Tensor

from vae_mlops.model import VAE, kl_divergence, recon_loss
from vae_mlops.params import TrainParams


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
    noise: torch.Generator  # eps of the reparameterisation
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


def make_optimizer(model: VAE, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """Adam with its fused kernel: one pass over all parameters instead of several per tensor."""
    return torch.optim.Adam(model.parameters(), lr=lr, fused=True)


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


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def batch_losses(model: VAE, x: Tensor, eps: Tensor, likelihood: str, precision: str) -> tuple[Tensor, Tensor]:
    """Per-batch summed (recon, kl); the network may run in bf16, the loss always in float32."""
    with _autocast(x.device, precision):
        logits, mu, log_std = model(x, eps)
    return recon_loss(logits.float(), x, likelihood).sum(), kl_divergence(mu.float(), log_std.float()).sum()


@torch.no_grad()
def evaluate_loss(model: VAE, x: Tensor, cfg: TrainParams, likelihood: str, epoch: int) -> tuple[float, float]:
    """Mean (recon, kl) per image on held-out data, with noise seeded by (seed, epoch)."""
    model.eval()
    g = torch.Generator(device=x.device).manual_seed(cfg.seed + 7919 * epoch)
    sums = torch.zeros(2, device=x.device)
    for i in range(0, len(x), 1000):
        xb = x[i : i + 1000]
        eps = torch.randn((len(xb), model.config.latent_dim), generator=g, device=x.device)
        r, k = batch_losses(model, xb, eps, likelihood, cfg.precision)
        sums += torch.stack([r, k])
    model.train()
    recon, kl = (sums / len(x)).tolist()
    return recon, kl


class _Progress:
    """tqdm bar on a terminal; one line per epoch otherwise (logs, CI, DVC)."""

    def __init__(self, total_batches: int, epoch: int, epochs: int) -> None:
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_batches, desc=f"epoch {epoch}/{epochs}", leave=False, unit="batch")

    def update(self, loss: Callable[[], float]) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if self.bar.n % 20 == 0:
                self.bar.set_postfix(loss=f"{loss():.2f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train_epoch(state: TrainState, x_train: Tensor, cfg: TrainParams, likelihood: str, epochs: int) -> Tensor:
    """One epoch over `x_train`; returns device sums (loss, recon, kl, first bad batch or -1)."""
    model, opt = state.model, state.optimizer
    epoch = state.epoch + 1
    n, latent, device = len(x_train), model.config.latent_dim, x_train.device
    xs = x_train[epoch_permutation(n, cfg.seed, epoch, device)]  # one gather, then contiguous slices
    sums = torch.zeros(3, device=device)
    bad = torch.tensor(-1, device=device)
    progress = _Progress(math.ceil(n / cfg.batch_size), epoch, epochs)
    model.train()
    for b, i in enumerate(range(0, n, cfg.batch_size)):
        xb = xs[i : i + cfg.batch_size]
        eps = torch.randn((len(xb), latent), generator=state.noise, device=device)
        recon, kl = batch_losses(model, xb, eps, likelihood, cfg.precision)
        loss = (recon + cfg.beta * kl) / len(xb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        parts = torch.stack([recon + cfg.beta * kl, recon, kl]).detach()
        sums += parts
        bad = torch.where((bad < 0) & ~torch.isfinite(parts).all(), torch.tensor(b, device=device), bad)
        progress.update(lambda: (sums[0] / min(n, i + len(xb))).item())
    progress.close()
    return torch.cat([sums / n, bad.view(1).float()])


def fit(
    state: TrainState,
    x_train: Tensor,
    x_val: Tensor,
    cfg: TrainParams,
    likelihood: str,
    on_epoch: Callable[[EpochStats, TrainState], None] = lambda stats, state: None,
) -> list[dict]:
    """Train from `state.epoch` to `cfg.epochs`, calling `on_epoch` after each finished epoch.

    Raises `TrainingDiverged` before `on_epoch` when the loss is not finite, so
    the last checkpoint written stays the last good one.
    """
    while state.epoch < cfg.epochs:
        t0 = time.perf_counter()
        loss, recon, kl, bad = train_epoch(state, x_train, cfg, likelihood, cfg.epochs).tolist()
        epoch = state.epoch + 1
        if bad >= 0:
            raise TrainingDiverged(
                f"loss became NaN/inf at epoch {epoch}, batch {int(bad)} (train.lr={cfg.lr}); "
                "lower train.lr or check the data. The last good checkpoint is kept; nothing was evaluated."
            )
        val_recon, val_kl = evaluate_loss(state.model, x_val, cfg, likelihood, epoch)
        stats = EpochStats(
            epoch, loss, recon, kl, val_recon + cfg.beta * val_kl, val_recon, val_kl, time.perf_counter() - t0
        )
        state.epoch = epoch
        state.history.append(stats.to_dict())
        on_epoch(stats, state)
    return state.history
