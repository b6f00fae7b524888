"""The hand-written ELBO step (`FusedELBO`) against autograd, and the loop's precisions against each other."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_raw_params
from synthetic import digits
from vae_mlops.model import VAE, VAEConfig
from vae_mlops.params import parse_params
from vae_mlops.train import ELBOSums, FusedELBO, TrainState, batch_losses, fit, make_optimizer

LIKELIHOODS = ("bernoulli", "gaussian")
BETA = 0.7  # != 1, so a mix-up of the recon and KL gradients shows


D, H, L = 12, 7, 3  # small enough for gradcheck's finite differences of every weight


def small_vae(likelihood: str, seed: int = 0) -> VAE:
    torch.manual_seed(seed)
    return VAE(VAEConfig(D, H, L, likelihood)).double()


def batch(n: int = 5, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, D), generator=g, dtype=torch.float64), torch.randn((n, L), generator=g, dtype=torch.float64)


def grads_of(model: VAE, parts: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    parts.backward(torch.tensor([1.0, beta], dtype=parts.dtype))
    return {name: p.grad.clone() for name, p in model.named_parameters()}


# ---------------------------------------------------------------- one step against autograd


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_fused_sums_equal_autograds(likelihood):
    model = small_vae(likelihood)
    x, eps = batch()
    fused = ELBOSums(model, "float32", fused=True)(x, eps)
    recon, kl = batch_losses(model, x, eps, likelihood, "float32")
    torch.testing.assert_close(fused, torch.stack([recon, kl]), rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_fused_gradients_equal_autograds_in_float64(likelihood):
    model = small_vae(likelihood)
    x, eps = batch()
    want = grads_of(model, torch.stack(batch_losses(model, x, eps, likelihood, "float32")), BETA)
    got = grads_of(model, ELBOSums(model, "float32", fused=True)(x, eps), BETA)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_fused_gradients_equal_autograds_in_float32(likelihood):
    """What training runs: float32, batch 128, the default network's width."""
    torch.manual_seed(0)
    model = VAE(VAEConfig(784, 400, 20, likelihood))
    g = torch.Generator().manual_seed(1)
    x, eps = torch.rand((128, 784), generator=g), torch.randn((128, 20), generator=g)
    want = grads_of(model, torch.stack(batch_losses(model, x, eps, likelihood, "float32")), BETA)
    got = grads_of(model, ELBOSums(model, "float32", fused=True)(x, eps), BETA)
    for name in want:
        scale = want[name].abs().max().item()
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_fused_backward_passes_gradcheck(likelihood):
    """Finite differences in float64, for any weighting of (recon, kl): gradcheck draws its own."""
    model = small_vae(likelihood)
    x, eps = batch()
    m = model
    params = [
        p.detach().clone().requires_grad_(True)
        for p in (
            m.fc1.weight, m.fc1.bias, m.fc_mu.weight, m.fc_mu.bias, m.fc_log_std.weight, m.fc_log_std.bias,
            m.fc3.weight, m.fc3.bias, m.fc4.weight, m.fc4.bias,
        )
    ]  # fmt: skip
    assert torch.autograd.gradcheck(lambda *w: FusedELBO.apply(x, eps, likelihood, *w), params, eps=1e-6, atol=1e-6)


# ---------------------------------------------------------------- whole runs


@pytest.fixture
def train_params(tiny_mirror):
    return lambda **extra: parse_params(tiny_raw_params(**{"train.epochs": 3, **extra})).train


def run(cfg, likelihood: str = "bernoulli") -> list[dict]:
    images, _ = digits(400, seed=0)
    x = torch.from_numpy(images.reshape(400, -1)).float() / 255
    torch.manual_seed(cfg.seed)
    model = VAE(VAEConfig(784, 32, 4, likelihood))
    state = TrainState(model, make_optimizer(model, cfg.lr, x.device), torch.Generator().manual_seed(cfg.seed))
    return fit(state, x[:300], x[300:], cfg, likelihood)


def losses(history: list[dict]) -> list[list[float]]:
    return [[row[k] for k in row if k not in ("epoch", "seconds")] for row in history]


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_fused_and_autograd_training_give_the_same_history(train_params, likelihood):
    fused = run(train_params(**{"train.fused": True, "train.beta": BETA}), likelihood)
    autograd = run(train_params(**{"train.fused": False, "train.beta": BETA}), likelihood)
    assert len(fused) == 3
    torch.testing.assert_close(torch.tensor(losses(fused)), torch.tensor(losses(autograd)), rtol=1e-4, atol=1e-4)


def test_bf16_trains_to_a_finite_loss_close_to_float32s(train_params):
    full = run(train_params(**{"train.precision": "float32"}))
    bf16 = run(train_params(**{"train.precision": "bf16"}))
    assert all(math.isfinite(v) for row in losses(bf16) for v in row)
    assert bf16[-1]["train_loss"] < bf16[0]["train_loss"]  # it learns
    assert bf16[-1]["val_loss"] == pytest.approx(full[-1]["val_loss"], rel=0.02)
