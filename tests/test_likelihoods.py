"""Every likelihood against independent computations; the continuous Bernoulli against torch.distributions."""

from __future__ import annotations

import math
import pkgutil

import pytest
import torch
from torch.distributions import Bernoulli, ContinuousBernoulli, Normal

import vae_mlops.likelihoods as likelihoods_pkg
from vae_mlops import accel
from vae_mlops.likelihoods import LIKELIHOODS, get_likelihood
from vae_mlops.model import VAE, VAEConfig, elbo, iwae_log_likelihood, kl_divergence
from vae_mlops.params import LIKELIHOODS as PARAM_LIKELIHOODS

CB = get_likelihood("continuous-bernoulli")


def torch_px(name: str, logits: torch.Tensor):
    """The same p(x|z) written with torch.distributions: the independent computation."""
    return {
        "bernoulli": lambda: Bernoulli(logits=logits),
        "gaussian": lambda: Normal(torch.sigmoid(logits), math.sqrt(0.5)),
        "continuous-bernoulli": lambda: ContinuousBernoulli(logits=logits),
    }[name]()


def pixels(name: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    return x.round() if name == "bernoulli" else x  # Bernoulli.log_prob wants binary pixels


# ---------------------------------------------------------------- the registry


def test_every_module_of_the_package_is_a_registered_likelihood():
    modules = {m.name for m in pkgutil.iter_modules(likelihoods_pkg.__path__)} - {"base"}
    assert {name.replace("-", "_") for name in LIKELIHOODS} == modules
    assert {"bernoulli", "gaussian", "continuous-bernoulli"} <= LIKELIHOODS.keys()


def test_params_allow_exactly_the_registered_likelihoods():
    assert set(PARAM_LIKELIHOODS) == set(LIKELIHOODS)


def test_unknown_likelihood_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="continuous-bernoulli"):
        get_likelihood("poisson")


# ---------------------------------------------------------------- every likelihood


@pytest.mark.parametrize("name", list(LIKELIHOODS))
def test_log_prob_matches_torch_distributions(name):
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(4, 50, generator=g, dtype=torch.float64)
    x = pixels(name, (4, 50), g)
    expected = torch_px(name, logits).log_prob(x).sum(-1)
    torch.testing.assert_close(get_likelihood(name).log_prob(logits, x), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", list(LIKELIHOODS))
def test_fused_sum_and_gradient_equal_autograd_of_the_loss(name):
    lik = get_likelihood(name)
    g = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(6, 40, generator=g, dtype=torch.float64)).requires_grad_(True)
    x = torch.rand(6, 40, generator=g, dtype=torch.float64)
    loss = lik.recon_loss(logits, x).sum()
    loss.backward()
    with torch.no_grad():
        torch.testing.assert_close(lik.recon_sum(logits, x), loss.detach(), rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(lik.recon_grad(logits, x, torch.tensor(0.5, dtype=torch.float64)), 0.5 * logits.grad)


@pytest.mark.parametrize("name", list(LIKELIHOODS))
def test_mean_is_on_the_unit_interval_and_matches_torch(name):
    wide = torch.linspace(-1e4, 1e4, 20001, dtype=torch.float64)
    mean = get_likelihood(name).mean(wide)
    assert (mean >= 0).all() and (mean <= 1).all() and (mean.diff() >= 0).all()  # increasing in the logit
    logits = torch.linspace(-10, 10, 2001, dtype=torch.float64)  # torch clamps probabilities beyond
    torch.testing.assert_close(get_likelihood(name).mean(logits), torch_px(name, logits).mean, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(LIKELIHOODS))
@pytest.mark.parametrize("per", [1, 3, 100])  # one sample per chunk, a ragged last chunk, one chunk
def test_iwae_fast_path_equals_decoding_every_sample(name, per):
    torch.manual_seed(2)
    model = VAE(VAEConfig(30, 8, 3, name)).double()
    g = torch.Generator().manual_seed(3)
    x, z = pixels(name, (4, 30), g), torch.randn(5, 4, 3, generator=g, dtype=torch.float64)
    with torch.no_grad():
        fast = accel.iwae_log_px(model.likelihood, model.decode_hidden, model.fc4, x, z, per)
        naive = torch.stack([torch_px(name, model.decode_logits(zi)).log_prob(x).sum(-1) for zi in z])
    torch.testing.assert_close(fast, naive, rtol=1e-9, atol=1e-8)


# ---------------------------------------------------------------- the continuous Bernoulli


def test_continuous_bernoulli_is_a_density_on_the_unit_interval():
    """Its normaliser makes it integrate to 1 for any logit (Loaiza-Ganem & Cunningham 2019, eq. 7)."""
    x = torch.linspace(0, 1, 20001, dtype=torch.float64)
    for l in (-30.0, -4.0, -0.3, 0.0, 1e-7, 0.05, 0.1, 0.5, 2.0, 30.0):
        logits = torch.full_like(x, l)
        density = torch.exp(-(CB.log_partition(logits) - x * logits))
        assert torch.trapezoid(density, x).item() == pytest.approx(1.0, abs=1e-6), l


def test_continuous_bernoulli_is_stable_and_smooth_near_one_half():
    """At lambda = 1/2 (l = 0) the closed forms are 0/0: the Taylor series must join them without a step."""
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-6)):
        for cut in (0.1, -0.1, 0.5, -0.5):  # where `continuous_bernoulli` switches between series and closed form
            a, b = torch.tensor([cut * (1 - 1e-4), cut * (1 + 1e-4)], dtype=dtype)
            step = b - a
            # A' = E[x] and E[x]' = 1/12 - l^2/240 + l^4/6048 - ...: a step at the switch would show above these slopes
            assert abs(CB.log_partition(b) - CB.log_partition(a) - CB.mean((a + b) / 2) * step) < tol, (dtype, cut)
            assert abs(CB.mean(b) - CB.mean(a) - step * (1 / 12 - cut**2 / 240 + cut**4 / 6048)) < tol, (dtype, cut)
    logits = torch.tensor([0.0, 1e-30, -1e-8, 1e-3], requires_grad=True)
    value = CB.log_prob(logits.view(1, -1), torch.full((1, 4), 0.3))
    value.backward()
    assert torch.isfinite(value).all() and torch.isfinite(logits.grad).all()
    assert CB.mean(torch.zeros(1)).item() == 0.5
    torch.testing.assert_close(CB.log_partition(torch.zeros(1)), -torch.tensor([math.log(2.0)]) + math.log(2.0))


def test_continuous_bernoulli_matches_torch_near_one_half():
    logits = torch.tensor([-2e-3, -1e-6, 0.0, 1e-6, 2e-3, 0.09, 0.11, 0.45, 0.55], dtype=torch.float64)
    x = torch.linspace(0, 1, len(logits), dtype=torch.float64)
    expected = ContinuousBernoulli(logits=logits).log_prob(x)
    torch.testing.assert_close(-(CB.log_partition(logits) - x * logits), expected, rtol=1e-7, atol=1e-7)


def test_continuous_bernoulli_elbo_matches_torch_distributions():
    torch.manual_seed(4)
    model = VAE(VAEConfig(784, 32, 3, "continuous-bernoulli")).eval()
    x = torch.rand(5, 784, generator=torch.Generator().manual_seed(5))
    got = elbo(model, x, torch.Generator().manual_seed(6))
    with torch.no_grad():
        mu, log_std = model.encode(x)
        eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(6))
        logits = model.decode_logits(mu + eps * log_std.exp())
        want = ContinuousBernoulli(logits=logits).log_prob(x).sum(-1) - kl_divergence(mu, log_std)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


def test_continuous_bernoulli_iwae_is_at_least_the_elbo_and_matches_a_naive_computation():
    torch.manual_seed(7)
    model, k = VAE(VAEConfig(784, 32, 3, "continuous-bernoulli")).eval(), 6
    x = torch.rand(3, 784, generator=torch.Generator().manual_seed(8))
    fast = iwae_log_likelihood(model, x, k, torch.Generator().manual_seed(9), chunk=7)
    eps = torch.randn((k, 3, 3), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        mu, log_std = model.encode(x)
        q = Normal(mu, log_std.exp())
        z = mu + eps * log_std.exp()  # (k, 3, 3)
        log_w = (
            ContinuousBernoulli(logits=model.decode_logits(z)).log_prob(x).sum(-1)
            + Normal(0.0, 1.0).log_prob(z).sum(-1) - q.log_prob(z).sum(-1)
        )  # fmt: skip
        naive = torch.logsumexp(log_w, 0) - math.log(k)
        many = torch.cat([elbo(model, x, torch.Generator().manual_seed(s)).view(1, -1) for s in range(200)])
    torch.testing.assert_close(fast, naive, rtol=1e-4, atol=1e-3)
    big = iwae_log_likelihood(model, x, 200, torch.Generator().manual_seed(10))
    assert (big >= many.mean(0) - 0.5).all()  # IWAE >= ELBO in expectation (Burda et al. 2016, Theorem 1)


def test_continuous_bernoulli_decodes_to_its_mean_not_to_lambda():
    torch.manual_seed(11)
    model = VAE(VAEConfig(784, 16, 2, "continuous-bernoulli")).double()
    z = torch.randn(3, 2, dtype=torch.float64)
    with torch.no_grad():
        want = ContinuousBernoulli(logits=model.decode_logits(z)).mean
        torch.testing.assert_close(model.decode(z), want, rtol=1e-5, atol=1e-5)


def test_softplus_sum_matches_torch_for_any_width_and_extreme_logits():
    from vae_mlops.likelihoods.base import softplus_sum

    g = torch.Generator().manual_seed(12)
    for d in (784, 12, 7, 1):  # groups of 16, of 12, of 7, of 1
        logits = torch.cat([6 * torch.randn(50, d, generator=g), torch.full((1, d), -1e4), torch.full((1, d), 1e4)])
        want = torch.nn.functional.softplus(logits.double()).sum(-1)
        torch.testing.assert_close(softplus_sum(logits).double(), want, rtol=1e-6, atol=1e-4)


def test_softplus_sum_in_place_equals_the_plain_one_and_leaves_nothing_else_changed():
    """The IWAE loop's variant overwrites its two buffers and must give the plain sum to the last bit."""
    from vae_mlops.likelihoods.base import softplus_sum, softplus_sum_

    g = torch.Generator().manual_seed(16)
    for d in (784, 12, 7):
        logits = torch.cat([6 * torch.randn(40, d, generator=g) - 8, torch.full((1, d), -1e4), torch.full((1, d), 1e4)])
        want = softplus_sum(logits)
        work, scratch = logits.clone(), torch.empty_like(logits)
        got = softplus_sum_(work, scratch)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        double = torch.nn.functional.softplus(logits.double()).sum(-1)
        torch.testing.assert_close(got.double(), double, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("name", list(LIKELIHOODS))
def test_iwae_with_bf16_decoding_stays_close_to_float32(name):
    torch.manual_seed(13)
    model = VAE(VAEConfig(784, 64, 4, name)).eval()
    x = pixels(name, (20, 784), torch.Generator().manual_seed(14)).float()
    full = iwae_log_likelihood(model, x, 50, torch.Generator().manual_seed(15))
    half = iwae_log_likelihood(model, x, 50, torch.Generator().manual_seed(15), mm_dtype=torch.bfloat16)
    assert half.dtype == torch.float32
    assert abs(half.mean() - full.mean()).item() < 0.1  # nats per image, the bar for bf16 decoding
