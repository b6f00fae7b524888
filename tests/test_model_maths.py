"""The VAE's maths against independent computations."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, Independent, Normal, kl_divergence as torch_kl

from vae_mlops.model import VAE, VAEConfig, kl_divergence, log_likelihood, reparameterize, vae_loss


def test_kl_is_zero_at_standard_normal():
    mu, log_std = torch.zeros(3, 5), torch.zeros(3, 5)
    assert torch.allclose(kl_divergence(mu, log_std), torch.zeros(3))


def test_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu, log_std = torch.randn(4, 6, generator=g), 0.5 * torch.randn(4, 6, generator=g)
    q = Independent(Normal(mu, log_std.exp()), 1)
    p = Independent(Normal(torch.zeros(6), torch.ones(6)), 1)
    assert torch.allclose(kl_divergence(mu, log_std), torch_kl(q, p), atol=1e-5)


def test_kl_agrees_with_monte_carlo_estimate():
    g = torch.Generator().manual_seed(1)
    mu, log_std = torch.tensor([[0.7, -1.2, 0.3]]), torch.tensor([[-0.4, 0.2, -1.0]])
    q, p = Normal(mu, log_std.exp()), Normal(0.0, 1.0)
    z = mu + log_std.exp() * torch.randn(400_000, 3, generator=g)
    mc = (q.log_prob(z) - p.log_prob(z)).sum(-1).mean()
    assert abs(mc.item() - kl_divergence(mu, log_std).item()) < 0.01


def test_bernoulli_loss_equals_the_tutorials_bce_formula():
    g = torch.Generator().manual_seed(2)
    logits, x = torch.randn(5, 784, generator=g), torch.rand(5, 784, generator=g)
    mu, log_std = torch.randn(5, 20, generator=g), 0.1 * torch.randn(5, 20, generator=g)
    logvar = 2 * log_std
    # pytorch/examples vae: BCE(sum) + -0.5 * sum(1 + logvar - mu^2 - exp(logvar)), here averaged per image
    bce = F.binary_cross_entropy(torch.sigmoid(logits), x, reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    parts = vae_loss(logits, x, mu, log_std, "bernoulli")
    assert torch.allclose(parts.loss, (bce + kld) / 5, rtol=1e-5)
    assert torch.allclose(parts.kl, kld / 5, rtol=1e-5)


def test_gaussian_loss_equals_the_tutorials_mse_sum():
    g = torch.Generator().manual_seed(3)
    logits, x = torch.randn(5, 784, generator=g), torch.rand(5, 784, generator=g)
    mu, log_std = torch.randn(5, 10, generator=g), 0.1 * torch.randn(5, 10, generator=g)
    mse = F.mse_loss(torch.sigmoid(logits), x, reduction="sum")
    kld = 0.5 * torch.sum(mu.pow(2) + torch.exp(2 * log_std) - 1 - 2 * log_std)
    parts = vae_loss(logits, x, mu, log_std, "gaussian", beta=0.5)
    assert torch.allclose(parts.loss, (mse + 0.5 * kld) / 5, rtol=1e-5)


def test_gaussian_log_likelihood_is_normal_density_with_variance_one_half():
    g = torch.Generator().manual_seed(4)
    logits, x = torch.randn(3, 784, generator=g), torch.rand(3, 784, generator=g)
    expected = Normal(torch.sigmoid(logits), math.sqrt(0.5)).log_prob(x).sum(-1)
    assert torch.allclose(log_likelihood(logits, x, "gaussian"), expected, rtol=1e-5)


def test_bernoulli_log_likelihood_matches_torch_distribution_on_binary_pixels():
    g = torch.Generator().manual_seed(5)
    logits, x = torch.randn(3, 784, generator=g), (torch.rand(3, 784, generator=g) > 0.5).float()
    expected = Bernoulli(logits=logits).log_prob(x).sum(-1)
    assert torch.allclose(log_likelihood(logits, x, "bernoulli"), expected, rtol=1e-5)


def test_bernoulli_loss_is_stable_for_extreme_logits():
    logits = torch.tensor([[-200.0, 200.0]])
    x = torch.tensor([[1.0, 0.0]])
    parts = vae_loss(logits, x, torch.zeros(1, 2), torch.zeros(1, 2), "bernoulli")
    assert torch.isfinite(parts.loss) and math.isclose(parts.recon.item(), 400.0, rel_tol=1e-6)


def test_gradients_flow_through_the_reparameterisation():
    mu = torch.zeros(2, 3, requires_grad=True)
    log_std = torch.zeros(2, 3, requires_grad=True)
    z = reparameterize(mu, log_std, eps=torch.ones(2, 3))
    z.sum().backward()
    assert torch.equal(mu.grad, torch.ones(2, 3))
    assert torch.allclose(log_std.grad, torch.ones(2, 3))  # d/dlog_std of eps*exp(log_std) at 0


def test_every_parameter_gets_a_gradient_from_the_loss():
    torch.manual_seed(0)
    model = VAE(VAEConfig(784, 32, 4, "bernoulli"))
    x = torch.rand(8, 784)
    logits, mu, log_std = model(x)
    vae_loss(logits, x, mu, log_std, "bernoulli").loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_model_has_the_tutorials_shapes():
    model = VAE(VAEConfig(784, 400, 20, "bernoulli"))
    logits, mu, log_std = model(torch.rand(3, 784))
    assert logits.shape == (3, 784) and mu.shape == (3, 20) and log_std.shape == (3, 20)
    assert model.decode(torch.randn(2, 20)).min() >= 0 and model.decode(torch.randn(2, 20)).max() <= 1


def test_fast_softplus_matches_torch_and_stays_finite_at_extreme_logits():
    from vae_mlops.likelihoods import softplus

    logits = torch.cat([torch.randn(10_000, dtype=torch.float64) * 5, torch.tensor([-1e4, -80.0, 0.0, 80.0, 1e4]).double()])
    assert torch.allclose(softplus(logits.float()).double(), F.softplus(logits), rtol=1e-6, atol=1e-6)
    assert torch.isfinite(softplus(torch.tensor([-1e30, 1e30]))).all()
