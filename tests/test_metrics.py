"""Test metrics against independent computations: IWAE, clustering scores, active units, validation."""

from __future__ import annotations

import math

import pytest
import torch
from tests.support.synthetic import digits
from torch.distributions import Bernoulli, Normal

from vae_mlops.metrics import (
    IWAE_TOLERANCE,
    METRIC_KEYS,
    MetricsError,
    active_units,
    cluster_scores,
    evaluate_model,
    linear_probe,
    mixture_scores,
    validate_metrics,
)
from vae_mlops.model import VAE, VAEConfig, elbo, iwae_log_likelihood, kl_divergence, log_normal, vae_loss
from vae_mlops.params import EvaluateParams

CFG = EvaluateParams(iwae_samples=20, batch_size=64, seed=0, n_clusters=10, latent_map="pca")


def _unit(images) -> torch.Tensor:
    return torch.from_numpy(images).reshape(len(images), -1).float() / 255


@pytest.fixture(scope="module")
def trained() -> VAE:
    """784-64-4 bernoulli VAE, 15 epochs on 600 synthetic digits: a few seconds on a CPU."""
    torch.manual_seed(0)
    model = VAE(VAEConfig(784, 64, 4, "bernoulli"))
    x = _unit(digits(600, seed=0)[0])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: a second thread only adds sync cost, ten times over on a busy CPU
    try:
        for _ in range(15):
            for xb in x[torch.randperm(len(x))].split(64):
                logits, mu, log_std = model(xb)
                opt.zero_grad()
                vae_loss(logits, xb, mu, log_std, "bernoulli").loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture(scope="module")
def test_split() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = digits(200, seed=1)
    return _unit(images), torch.from_numpy(labels).long()


def _random_model(likelihood: str, seed: int = 0) -> VAE:
    torch.manual_seed(seed)
    return VAE(VAEConfig(784, 32, 3, likelihood)).eval()


# ---------------------------------------------------------------- IWAE


def test_iwae_with_one_sample_equals_the_elbo_in_expectation():
    model, x = _random_model("bernoulli"), torch.rand(4, 784)
    draws = 3000
    reps = x.repeat(draws, 1)  # (draws * 4, 784): independent noise for every copy
    iwae = iwae_log_likelihood(model, reps, 1, torch.Generator().manual_seed(1)).view(draws, 4)
    ref = elbo(model, reps, torch.Generator().manual_seed(2)).view(draws, 4)
    diff = iwae.mean(0) - ref.mean(0)
    stderr = (iwae.var(0) / draws + ref.var(0) / draws).sqrt()
    assert (diff.abs() < 4 * stderr).all(), (diff, stderr)


def test_iwae_with_one_sample_is_the_elbo_with_a_sampled_kl_given_the_same_noise():
    # k = 1: log p(x|z) + log p(z) - log q(z|x); the ELBO has the closed-form KL in place of the last two.
    model, x = _random_model("gaussian"), torch.rand(6, 784)
    iwae = iwae_log_likelihood(model, x, 1, torch.Generator().manual_seed(3))
    ref = elbo(model, x, torch.Generator().manual_seed(3))
    with torch.no_grad():
        mu, log_std = model.encode(x)
    z = mu + torch.randn(mu.shape, generator=torch.Generator().manual_seed(3)) * log_std.exp()
    sampled_kl = log_normal(z, mu, log_std) - log_normal(z, torch.zeros_like(z), torch.zeros_like(z))
    assert torch.allclose(iwae, ref + kl_divergence(mu, log_std) - sampled_kl, atol=1e-3)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("chunk", [1, 7, 10_000])  # one sample per chunk, a ragged last chunk, one chunk
def test_iwae_matches_a_naive_computation_with_torch_distributions(likelihood, chunk):
    model, k = _random_model(likelihood, seed=4), 5
    g = torch.Generator().manual_seed(5)
    x = torch.rand(3, 784, generator=g)
    if likelihood == "bernoulli":
        x = x.round()  # Bernoulli.log_prob wants binary pixels
    fast = iwae_log_likelihood(model, x, k, torch.Generator().manual_seed(6), chunk=chunk)

    eps = torch.randn((k, 3, 3), generator=torch.Generator().manual_seed(6))  # the same draw, same order
    naive = []
    with torch.no_grad():
        mu, log_std = model.encode(x)
        for b in range(3):
            q = Normal(mu[b], log_std[b].exp())
            log_w = []
            for i in range(k):
                z = mu[b] + eps[i, b] * log_std[b].exp()
                logits = model.decode_logits(z)
                px = Bernoulli(logits=logits) if likelihood == "bernoulli" else Normal(logits.sigmoid(), 0.5**0.5)
                log_w.append(px.log_prob(x[b]).sum() + Normal(0.0, 1.0).log_prob(z).sum() - q.log_prob(z).sum())
            naive.append(torch.logsumexp(torch.stack(log_w), 0) - math.log(k))
    assert torch.allclose(fast, torch.stack(naive), atol=1e-3)


def test_iwae_bound_is_at_least_the_elbo_on_a_trained_model(trained, test_split):
    x, _ = test_split
    bound = iwae_log_likelihood(trained, x, 50, torch.Generator().manual_seed(7)).mean()
    mean_elbo = torch.stack([elbo(trained, x, torch.Generator().manual_seed(s)) for s in range(10)]).mean()
    assert bound >= mean_elbo


def test_iwae_bound_tightens_as_k_grows(trained, test_split):
    x, _ = test_split
    bounds = [iwae_log_likelihood(trained, x, k, torch.Generator().manual_seed(8)).mean() for k in (1, 10, 100)]
    assert bounds[0] < bounds[1] < bounds[2]


# ---------------------------------------------------------------- latent clustering


def _separated_latents(n_per: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Ten tight blobs far apart; blob c carries label perm[c], so cluster ids and labels differ."""
    g = torch.Generator().manual_seed(9)
    centres = 20 * torch.eye(10)
    blob = torch.arange(10).repeat_interleave(n_per)
    mu = centres[blob] + 0.1 * torch.randn(len(blob), 10, generator=g)
    perm = torch.randperm(10, generator=g)
    return mu, perm[blob]


def test_clustering_scores_are_perfect_for_separated_latents_with_permuted_labels():
    mu, labels = _separated_latents()
    scores = cluster_scores(mu, labels, n_clusters=10, seed=0)
    assert scores["latent.accuracy"] == 1.0
    assert scores["latent.nmi"] == pytest.approx(1.0)
    assert scores["latent.ari"] == pytest.approx(1.0)
    assert scores["latent.silhouette"] > 0.9


def test_clustering_accuracy_is_near_chance_for_shuffled_labels():
    mu, labels = _separated_latents()
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(10))]
    scores = cluster_scores(mu, shuffled, n_clusters=10, seed=0)
    assert scores["latent.accuracy"] < 0.3
    assert scores["latent.nmi"] < 0.15 and abs(scores["latent.ari"]) < 0.05


def test_clustering_accuracy_maps_each_cluster_to_one_label_only():
    # Two blobs, three labels: label 2 shares blob 1 with label 1; only one of them can be matched.
    mu = torch.cat([torch.zeros(40, 2), torch.full((60, 2), 10.0)])
    labels = torch.tensor([0] * 40 + [1] * 35 + [2] * 25)
    assert cluster_scores(mu, labels, n_clusters=2, seed=0)["latent.accuracy"] == pytest.approx(0.75)


def test_clustering_is_the_same_twice_for_the_same_seed():
    mu = torch.randn(300, 5, generator=torch.Generator().manual_seed(11))
    labels = torch.arange(300) % 10
    assert cluster_scores(mu, labels, 10, seed=3) == cluster_scores(mu, labels, 10, seed=3)


def test_mixture_scores_are_perfect_for_permuted_cluster_ids_and_low_for_shuffled_ones():
    labels = torch.arange(500) % 10
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(14))
    perfect = mixture_scores(perm[labels], labels)
    assert perfect == {"latent.mixture_nmi": pytest.approx(1.0), "latent.mixture_ari": pytest.approx(1.0),
                       "latent.mixture_accuracy": 1.0}  # fmt: skip
    shuffled = mixture_scores(labels[torch.randperm(500, generator=torch.Generator().manual_seed(15))], labels)
    assert shuffled["latent.mixture_accuracy"] < 0.3 and shuffled["latent.mixture_nmi"] < 0.15


def test_linear_probe_reads_labels_a_line_separates_and_not_shuffled_ones():
    mu, labels = _separated_latents()
    fit, score = slice(0, None, 2), slice(1, None, 2)  # every blob on both sides
    assert linear_probe(mu[fit], labels[fit], mu[score], labels[score], seed=0) == 1.0
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(16))]
    assert linear_probe(mu[fit], shuffled[fit], mu[score], shuffled[score], seed=0) < 0.3


def test_a_mixture_prior_model_reports_its_own_clusters(test_split):
    torch.manual_seed(17)
    model = VAE(VAEConfig(784, 32, 3, "bernoulli", prior="gmm", n_components=4)).eval()
    x, labels = test_split
    metrics = evaluate_model(model, x, labels, CFG)
    assert {"latent.mixture_nmi", "latent.mixture_ari", "latent.mixture_accuracy"} <= set(metrics)
    clusters = model.cluster_probs(x).argmax(-1)
    assert metrics["latent.mixture_accuracy"] == mixture_scores(clusters, labels)["latent.mixture_accuracy"]
    validate_metrics({**metrics, "latent.probe_accuracy": 0.5}, latent_dim=3)


# ---------------------------------------------------------------- active units


def test_active_units_counts_only_dims_that_vary_across_images():
    g = torch.Generator().manual_seed(12)
    mu = torch.randn(500, 3, generator=g)
    mu[:, 1] = 0.05 * mu[:, 1] + 2.0  # variance 0.0025 < 0.01: a dim that barely depends on x
    assert active_units(mu) == 2


def test_a_latent_dim_that_ignores_x_is_inactive(test_split):
    model = _random_model("bernoulli", seed=13)
    with torch.no_grad():
        model.fc_mu.weight[0] = 0.0  # E[z_0 | x] is the bias, whatever x is
        model.fc_mu.weight[1:] *= 20  # the others clearly vary
    x, labels = test_split
    assert evaluate_model(model, x, labels, CFG)["test.active_units"] == 2.0


# ---------------------------------------------------------------- the metrics dict and its schema


@pytest.fixture(scope="module")
def train_split() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = digits(300, seed=2)
    return _unit(images), torch.from_numpy(labels).long()


def test_metrics_have_every_key_within_range(trained, test_split, train_split):
    x, labels = test_split
    metrics = evaluate_model(trained, x, labels, CFG, train=train_split)
    assert list(metrics) == list(METRIC_KEYS)  # a normal prior: none of the mixture's own keys
    assert metrics["latent.probe_accuracy"] > 0.8
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    validate_metrics(metrics, latent_dim=4)
    assert metrics["test.nll_iwae"] <= -metrics["test.elbo"]
    assert metrics["latent.accuracy"] > 0.5  # ten templates are easy to tell apart


def test_the_same_model_gives_the_same_metrics_twice(trained, test_split):
    x, labels = test_split
    assert evaluate_model(trained, x, labels, CFG) == evaluate_model(trained, x, labels, CFG)


def _good() -> dict[str, float]:
    return {
        "test.elbo": -105.5,
        "test.nll_iwae": 100.4,
        "test.recon_mse": 0.01,
        "test.recon_bce": 72.0,
        "test.kl": 25.5,
        "test.active_units": 20.0,
        "latent.nmi": 0.59,
        "latent.ari": 0.48,
        "latent.accuracy": 0.62,
        "latent.silhouette": 0.09,
        "latent.probe_accuracy": 0.9,
    }


@pytest.mark.parametrize(
    "key, value, why",
    [
        ("test.elbo", math.nan, "finite"),
        ("latent.silhouette", math.inf, "finite"),
        ("latent.nmi", 1.01, "in_range"),
        ("latent.ari", -0.2, "in_range"),
        ("latent.accuracy", 1.5, "in_range"),
        ("latent.silhouette", -1.1, "in_range"),
        ("test.nll_iwae", 105.5 + IWAE_TOLERANCE + 0.01, "test.nll_iwae <= -test.elbo"),
        ("test.active_units", 21.0, "less_than_or_equal_to(20)"),
        ("test.active_units", 3.5, "integer-valued"),
        ("test.kl", "25", "must be a number"),
        ("latent.probe_accuracy", 1.2, "in_range"),
        ("latent.mixture_accuracy", 1.5, "in_range"),  # optional, but checked when present
        ("latent.mixture_nmi", math.nan, "finite"),
    ],
)
def test_validate_metrics_rejects_a_bad_value_naming_its_key(key, value, why):
    with pytest.raises(MetricsError) as err:
        validate_metrics({**_good(), key: value}, latent_dim=20)
    (problem,) = err.value.problems
    assert problem.startswith(f"{key}: ") and why in problem


def test_validate_metrics_names_a_missing_key():
    metrics = _good()
    del metrics["latent.ari"]
    with pytest.raises(MetricsError, match="latent.ari: missing"):
        validate_metrics(metrics)


def test_validate_metrics_allows_iwae_within_tolerance_and_either_elbo_sign():
    validate_metrics({**_good(), "test.nll_iwae": 105.5 + IWAE_TOLERANCE / 2}, latent_dim=20)
    validate_metrics({**_good(), "test.elbo": 800.0, "test.nll_iwae": -810.0}, latent_dim=20)  # gaussian densities


# ---------------------------------------------------------------- behaviour of a trained model


def test_trained_model_prefers_digits_to_noise_and_to_shuffled_pixels(trained, test_split):
    x, _ = test_split
    g = torch.Generator().manual_seed(14)
    noise = torch.rand(x.shape, generator=g)
    shuffled = x[:, torch.randperm(x.shape[1], generator=g)]  # same grey values, structure gone

    def mean_elbo(images: torch.Tensor) -> float:
        return elbo(trained, images, torch.Generator().manual_seed(15)).mean().item()

    digits_elbo = mean_elbo(x)
    assert digits_elbo > mean_elbo(noise)
    assert digits_elbo > mean_elbo(shuffled)
