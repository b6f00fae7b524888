"""Architectures and priors: the mixture prior's maths against independent computations, every combination's
round trip through a model file and the JSON model format, the step's routing, and a tiny VaDE end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal
from sklearn.mixture import GaussianMixture
from torch.distributions import Normal

from tests.support.project import tiny_raw_params
from vae_mlops import checkpoint
from vae_mlops.archs import ARCHS
from vae_mlops.code_partition import partition_codes
from vae_mlops.metric_catalogue import MIXTURE_METRIC_KEYS, METRIC_KEYS
from vae_mlops.model import VAE, VAEConfig, elbo, iwae_log_likelihood, kl_divergence, reparameterize
from vae_mlops.model_store import vae_from_files
from vae_mlops.params import PARTITIONS, ParamsError, parse_params
from vae_mlops.priors import PRIORS
from vae_mlops.pretrain import glorot_initialise
from vae_mlops.priors.gmm import GaussianMixturePrior, vade_kl
from vae_mlops.step import ELBOSums

K, L = 3, 2
COMBINATIONS = [(arch, prior) for arch in ARCHS for prior in PRIORS]


def config(arch: str = "mlp", prior: str = "normal", likelihood: str = "bernoulli") -> VAEConfig:
    return VAEConfig(784, 24, L, likelihood, arch=arch, hidden_dims=(20, 12), prior=prior, n_components=K)


def gmm_prior(seed: int = 0) -> GaussianMixturePrior:
    """A mixture with distinct weights, means and spreads."""
    g = torch.Generator().manual_seed(seed)
    prior = GaussianMixturePrior(config(prior="gmm")).double()
    with torch.no_grad():
        prior.logits.copy_(torch.randn(K, generator=g, dtype=torch.float64))
        prior.mu.copy_(2 * torch.randn(K, L, generator=g, dtype=torch.float64))
        prior.log_std.copy_(0.4 * torch.randn(K, L, generator=g, dtype=torch.float64))
    return prior


def scipy_log_prob(prior: GaussianMixturePrior, z: np.ndarray) -> np.ndarray:
    pi = torch.softmax(prior.logits, -1).detach().numpy()
    mu, var = prior.mu.detach().numpy(), prior.log_std.detach().exp().square().numpy()
    per = [np.log(pi[c]) + multivariate_normal(mu[c], np.diag(var[c])).logpdf(z) for c in range(K)]
    return logsumexp(np.stack(per), axis=0)


# ---------------------------------------------------------------- the mixture prior's maths


def test_gmm_log_prob_matches_scipy():
    prior = gmm_prior()
    z = torch.randn(50, L, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    np.testing.assert_allclose(prior.log_prob(z).detach().numpy(), scipy_log_prob(prior, z.numpy()), rtol=1e-10)


def test_responsibilities_sum_to_one_and_equal_sklearns_posterior():
    prior = gmm_prior()
    z = torch.randn(40, L, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 3
    gamma = prior.responsibilities(z).detach()
    torch.testing.assert_close(gamma.sum(-1), torch.ones(40, dtype=torch.float64))
    gmm = GaussianMixture(K, covariance_type="diag")  # the same mixture, set by hand: its posterior p(c|z)
    gmm.weights_ = torch.softmax(prior.logits, -1).detach().numpy()
    gmm.means_ = prior.mu.detach().numpy()
    gmm.covariances_ = prior.log_std.detach().exp().square().numpy()
    gmm.precisions_cholesky_ = 1 / np.sqrt(gmm.covariances_)
    np.testing.assert_allclose(gamma.numpy(), gmm.predict_proba(z.numpy()), atol=1e-10)


def test_vade_kl_agrees_with_a_monte_carlo_estimate():
    # KL(q(z|x) q(c|x) || p(z, c)) = E_q(z|x) sum_c gamma_c [log q(z|x) + log gamma_c - log pi_c - log p(z|c)]
    prior = gmm_prior(3)
    mu, log_std = torch.tensor([[0.5, -1.0]], dtype=torch.float64), torch.tensor([[-0.3, 0.2]], dtype=torch.float64)
    gamma = torch.tensor([[0.2, 0.5, 0.3]], dtype=torch.float64)
    log_pi = torch.log_softmax(prior.logits, -1).detach()
    closed = vade_kl(mu, log_std, gamma.log(), log_pi, prior.mu.detach(), prior.log_std.detach())
    z = mu + log_std.exp() * torch.randn(400_000, L, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    log_q = Normal(mu, log_std.exp()).log_prob(z).sum(-1)  # (S,)
    log_pz_c = Normal(prior.mu.detach(), prior.log_std.detach().exp()).log_prob(z[:, None]).sum(-1)  # (S, K)
    mc = (gamma * (log_q[:, None] + gamma.log() - log_pi - log_pz_c)).sum(-1).mean()
    assert abs(closed.item() - mc.item()) < 0.01


def test_vade_kl_of_a_mixture_of_identical_standard_normals_is_the_standard_kl():
    mu, log_std = torch.randn(6, 4), 0.3 * torch.randn(6, 4)
    zeros = torch.zeros(2, 4)
    log_half = torch.full((6, 2), math.log(0.5))  # gamma = pi: the mixture adds nothing
    torch.testing.assert_close(vade_kl(mu, log_std, log_half, log_half[0], zeros, zeros), kl_divergence(mu, log_std))


@pytest.mark.parametrize("method", PARTITIONS)
def test_gmm_initialise_takes_the_fitted_mixture_of_the_grouped_codes(method):
    g = torch.Generator().manual_seed(5)
    centres = torch.tensor([[-6.0, 0.0], [0.0, 6.0], [6.0, 0.0]])
    codes = (centres[torch.arange(300) % 3] + 0.5 * torch.randn(300, 2, generator=g)).double()
    prior = GaussianMixturePrior(config(prior="gmm")).double()
    prior.initialise(codes, torch.from_numpy(partition_codes(codes.numpy(), 3, method, seed=0)))
    found = prior.mu.detach()[prior.mu.detach()[:, 0].argsort()]
    torch.testing.assert_close(found, centres.double()[centres[:, 0].argsort()], atol=0.2, rtol=0)
    torch.testing.assert_close(torch.softmax(prior.logits.detach(), -1), torch.full((3,), 1 / 3).double(), atol=0.02,
                               rtol=0)  # fmt: skip
    assert torch.allclose(prior.log_std.detach().exp(), torch.tensor(0.5).double(), atol=0.1)


# ---------------------------------------------------------------- ELBO and IWAE under each prior


@pytest.mark.parametrize(("arch", "prior"), COMBINATIONS)
def test_iwae_with_one_sample_is_log_px_plus_log_pz_minus_log_qz_under_the_prior(arch, prior):
    torch.manual_seed(6)
    model = VAE(config(arch, prior)).double().eval()
    x = (torch.rand(5, 784) > 0.5).double()  # binary: torch's Bernoulli checks its support
    iwae = iwae_log_likelihood(model, x, 1, torch.Generator().manual_seed(7))
    eps = torch.randn((1, 5, L), generator=torch.Generator().manual_seed(7), dtype=torch.float64)[0]
    with torch.no_grad():
        mu, log_std = model.encode(x)
        z = mu + eps * log_std.exp()
        log_px = torch.distributions.Bernoulli(logits=model.decode_logits(z)).log_prob(x).sum(-1)
        log_q = Normal(mu, log_std.exp()).log_prob(z).sum(-1)
        log_pz = torch.from_numpy(scipy_log_prob(model.prior, z.numpy())) if prior == "gmm" else \
            Normal(0.0, 1.0).log_prob(z).sum(-1)  # fmt: skip
    torch.testing.assert_close(iwae, log_px + log_pz - log_q)


@pytest.mark.parametrize("prior", list(PRIORS))
def test_iwae_with_one_sample_is_at_least_the_elbo_in_expectation(prior):
    # N(0, I): equal in expectation. A mixture: VaDE's KL(q(z)q(c) || p(z, c)) >= KL(q(z) || p(z)) for any q(c),
    # so its ELBO is at most the marginal ELBO that IWAE with k = 1 estimates.
    torch.manual_seed(8)
    model = VAE(config(prior=prior)).double().eval()
    x = torch.rand(4, 784, dtype=torch.float64).repeat(3000, 1)  # many samples of few images
    g = torch.Generator().manual_seed(9)
    iwae, bound = iwae_log_likelihood(model, x, 1, g).mean(), elbo(model, x, g).mean()
    assert iwae.item() >= bound.item() - 0.1
    if prior == "normal":
        assert abs(iwae.item() - bound.item()) < 0.1


def test_elbo_under_the_gmm_prior_is_the_likelihood_less_vades_kl():
    torch.manual_seed(10)
    model = VAE(config(prior="gmm")).double().eval()
    x, eps = torch.rand(3, 784, dtype=torch.float64), torch.randn(3, L, dtype=torch.float64)
    with torch.no_grad():
        mu, log_std = model.encode(x)
        z = reparameterize(mu, log_std, eps)
        gamma = model.prior.responsibilities(z)
        kl = vade_kl(mu, log_std, gamma.log(), torch.log_softmax(model.prior.logits, -1), model.prior.mu,
                     model.prior.log_std)  # fmt: skip
        want = model.likelihood.log_prob(model.decode_logits(z), x) - kl
    torch.testing.assert_close(elbo(model, x, eps=eps), want)


# ---------------------------------------------------------------- every combination through every path


@pytest.mark.parametrize(("arch", "prior"), COMBINATIONS)
def test_model_file_round_trip_keeps_every_tensor(arch, prior, tmp_path):
    torch.manual_seed(11)
    model = VAE(config(arch, prior)).eval()
    payload = checkpoint.model_payload(model, params={}, data_hash="0" * 64, history=[], epoch=1)
    checkpoint.save(tmp_path / "vae.pt", payload, sidecar=False)
    back, _ = checkpoint.load_model(tmp_path / "vae.pt")
    assert back.config == model.config
    want = model.state_dict()
    assert set(back.state_dict()) == set(want) and all(torch.equal(v, want[k]) for k, v in back.state_dict().items())
    x = torch.rand(3, 784)
    torch.testing.assert_close(back.decode(back.encode(x)[0]), model.decode(model.encode(x)[0]), rtol=0, atol=0)


@pytest.mark.parametrize(("arch", "prior"), COMBINATIONS)
def test_json_config_and_plain_weights_rebuild_the_model(arch, prior, tmp_path):
    # the registered model's format: a JSON config of plain fields and a tensor-only state_dict
    model = VAE(config(arch, prior)).eval()
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    back = vae_from_files(tmp_path / "weights.pt", tmp_path / "config.json")
    assert back.config == model.config
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in back.state_dict().items())


def test_the_default_mlp_keeps_the_layer_names_of_older_model_files():
    names = list(VAE(VAEConfig(784, 16, 2, "bernoulli")).state_dict())
    layers = ("fc1", "fc_mu", "fc_log_std", "fc3", "fc4")
    assert names == [f"{layer}.{p}" for layer in layers for p in ("weight", "bias")]


@pytest.mark.parametrize(("arch", "prior"), COMBINATIONS)
def test_only_the_mlp_with_a_normal_prior_takes_the_fused_step(arch, prior):
    torch.manual_seed(12)
    model = VAE(config(arch, prior)).double()
    sums = ELBOSums(model, "float32", fused=True)
    assert sums.fused == (arch == "mlp" and prior == "normal")
    x, eps = torch.rand(6, 784, dtype=torch.float64), torch.randn(6, L, dtype=torch.float64)
    recon, kl = model.loss_terms(x, eps)
    torch.testing.assert_close(sums(x, eps), torch.stack([recon.sum(), kl.sum()]))


@pytest.mark.parametrize(("arch", "prior"), COMBINATIONS)
def test_every_parameter_of_every_combination_learns(arch, prior):
    torch.manual_seed(13)
    model = VAE(config(arch, prior))
    recon, kl = model.loss_terms(torch.rand(4, 784), torch.randn(4, L))
    (recon + kl).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_conv_decodes_iwae_shaped_latents():
    model = VAE(config("conv")).eval()
    z = torch.randn(3, 5, L)
    assert model.decode_logits(z).shape == (3, 5, 784)
    torch.testing.assert_close(model.decode_logits(z)[1], model.decode_logits(z[1]))


def test_config_refuses_hidden_dims_that_are_not_positive_integers():
    with pytest.raises(TypeError, match="hidden_dims"):
        VAEConfig(784, 16, 2, "bernoulli", arch="mlp-deep", hidden_dims=["500"])


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"model.arch": "resnet"}, "model.arch: must be one of conv, mlp, mlp-deep"),
        ({"model.prior": "vamp"}, "model.prior: must be one of gmm, normal"),
        ({"model.arch": "mlp-deep", "model.hidden_dims": []}, "model.hidden_dims: mlp-deep needs"),
        ({"model.prior": "gmm", "model.n_components": 1}, "model.n_components: the gmm prior needs at least 2"),
        ({"register.metric": "latent.mixture_accuracy"}, "exists only for a mixture prior"),
        ({"train.lr_decay": 1.5}, "train.lr_decay"),
    ],
)
def test_params_name_what_is_wrong_with_the_model_choice(tiny_mirror, overrides, needle):
    with pytest.raises(ParamsError, match=needle):
        parse_params(tiny_raw_params(**overrides))


@pytest.mark.parametrize("arch", ARCHS)
def test_pretraining_starts_from_seeded_glorot_uniform_weights_and_zero_biases(arch):
    models = [VAE(config(arch, "gmm")) for _ in range(2)]
    for model in models:
        glorot_initialise(model, seed=3)
    first, second = ({k: v for k, v in m.state_dict().items() if not k.startswith("prior.")} for m in models)
    assert all(torch.equal(first[k], second[k]) for k in first)  # the seed alone decides the network's
    kinds = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d)
    layers = [m for m in models[0].modules() if isinstance(m, kinds)]
    assert layers
    for layer in layers:
        w = layer.weight  # (out, in, *kernel); a transposed convolution's (in, out, *kernel): the same sum
        bound = math.sqrt(6 / ((w.shape[0] + w.shape[1]) * w[0, 0].numel()))  # Glorot: sqrt(6 / (fan_in + fan_out))
        assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.9 * bound
        assert layer.bias is None or not layer.bias.any()


# ---------------------------------------------------------------- a tiny VaDE, end to end


@pytest.mark.slow
def test_tiny_vade_trains_resumes_and_evaluates_with_its_own_clusters_and_pictures(data_env, tmp_path):
    from vae_mlops.paths import Paths
    from vae_mlops.stages.download import download
    from vae_mlops.stages.evaluate import evaluate
    from vae_mlops.stages.train import train
    from vae_mlops.train import learning_rate

    overrides = {"model.arch": "mlp-deep", "model.hidden_dims": [48, 32], "model.prior": "gmm",
                 "model.n_components": 4, "train.pretrain_epochs": 2, "train.pretrain_partition": "umap",
                 "train.pretrain_batch_size": 64, "train.lr_decay": 0.5,
                 "train.lr_decay_epochs": 1, "evaluate.latent_map": "tsne"}  # fmt: skip
    params = parse_params(tiny_raw_params(**overrides))
    paths = Paths(tmp_path / "proj")
    download(params.data, paths)
    train(params, paths)
    straight = checkpoint.load_model(paths.model_file)[0].state_dict()
    assert {"prior.logits", "prior.mu", "prior.log_std"} <= set(straight)
    for f in paths.checkpoints_dir.rglob("epoch-0002.pt*"):
        f.unlink()  # as if killed in epoch 2: resumes from epoch 1's checkpoint, with epoch 2's learning rate
    paths.model_file.unlink()
    train(params, paths)
    resumed = checkpoint.load_model(paths.model_file)[0].state_dict()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert learning_rate(params.train, 2) == params.train.lr * 0.5
    scores = evaluate(params, paths)
    assert set(METRIC_KEYS) | set(MIXTURE_METRIC_KEYS) <= set(scores)
    assert 0.0 <= scores["latent.mixture_accuracy"] <= 1.0 and 0.0 <= scores["latent.probe_accuracy"] <= 1.0
    written = {p.name for p in paths.eval_images_dir.iterdir()}
    assert {"cluster_samples.png", "cluster_confusion.png", "latent_map.png"} <= written


@pytest.mark.slow  # a fresh interpreter compiles UMAP's numba kernels: about half a minute
def test_the_umap_partition_leaves_torchs_thread_count_as_it_found_it():
    # A fresh interpreter: numba sets OpenMP's thread count when its first parallel kernel starts its pool.
    script = (
        "import numpy as np, torch\n"
        "from vae_mlops.code_partition import partition_codes\n"
        "torch.set_num_threads(1)\n"
        "partition_codes(np.random.default_rng(0).normal(size=(300, 4)), 3, 'umap', seed=0)\n"
        "print(torch.get_num_threads())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "1"  # numba's pool set it to the machine's cores
