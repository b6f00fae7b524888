"""The VAE of Kingma & Welling (2014): an architecture, a prior and a likelihood; losses, ELBO and IWAE.

The architecture (`archs/`: the encoder and decoder), the prior p(z) (`priors/`) and the
likelihood p(x|z) (`likelihoods/`) are each chosen by name in `VAEConfig`. The encoder
outputs the mean and log standard deviation of a diagonal Gaussian q(z|x); `log_std` is
used everywhere (log-variance = 2 * log_std).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from vae_mlops import accel
from vae_mlops.archs import Network, get_arch
from vae_mlops.archs.mlp import MLP, MLPNetwork
from vae_mlops.likelihoods import Likelihood, get_likelihood
from vae_mlops.priors import Prior, get_prior
from vae_mlops.priors.base import log_normal
from vae_mlops.priors.normal import NormalPrior, kl_standard_normal

if TYPE_CHECKING:  # only the section's fields are read
    from vae_mlops.params import ModelParams

LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True)
class VAEConfig:
    """What rebuilds the network: stored in every checkpoint and, as JSON, in every model version.

    Plain fields only. The defaults of the last four are the model every older file holds
    (the `mlp` with an N(0, I) prior), so those files still load.
    """

    input_dim: int
    hidden_dim: int  # the `mlp`'s and the `conv`'s dense layer
    latent_dim: int
    likelihood: str  # a name in `likelihoods.LIKELIHOODS`
    arch: str = "mlp"  # a name in `archs.ARCHS`
    hidden_dims: tuple[int, ...] = ()  # the `mlp-deep`'s hidden sizes, input side first
    prior: str = "normal"  # a name in `priors.PRIORS`
    n_components: int = 0  # of a mixture prior

    def __post_init__(self) -> None:
        dims = self.hidden_dims
        if isinstance(dims, (str, bytes)) or not all(isinstance(h, int) and not isinstance(h, bool) and h > 0
                                                     for h in dims):
            raise TypeError(f"hidden_dims must be a list of positive integers, got {dims!r}")
        object.__setattr__(self, "hidden_dims", tuple(dims))  # a JSON list arrives as a list

    def to_dict(self) -> dict:
        return {**asdict(self), "hidden_dims": list(self.hidden_dims)}

    @property
    def fusable(self) -> bool:
        """Whether the fused step (`accel.fused_elbo`), written for the `mlp` and N(0, I), computes this model's step."""
        return self.arch == MLP.name and self.prior == "normal"


def config_from_params(model: ModelParams, input_dim: int = 784) -> VAEConfig:
    """The `VAEConfig` of params.yaml's `model` section, for images of `input_dim` pixels.

    `hidden_dims` and `n_components` are kept only where the architecture or prior uses them, so
    a config (and a model card) shows what shapes the network, and today's default stays as it was.
    """
    hidden_dims = tuple(model.hidden_dims) if get_arch(model.arch).uses_hidden_dims else ()
    n_components = model.n_components if get_prior(model.prior).mixture else 0
    return VAEConfig(
        input_dim, model.hidden_dim, model.latent_dim, model.likelihood,
        arch=model.arch, hidden_dims=hidden_dims, prior=model.prior, n_components=n_components,
    )  # fmt: skip


class VAE(nn.Module):
    """q(z|x) and p(x|z) from the architecture's network, p(z) from the prior, the likelihood on the logits.

    The network's layers are registered on the VAE itself under the network's names, so a
    state_dict reads `fc1.weight`, ... (the `mlp`, as every older model file) and `prior.*`
    for a learnable prior.
    """

    net: Network

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        net = get_arch(config.arch).build(config)
        for name, child in net.named_children():
            self.add_module(name, child)
        self.__dict__["net"] = net  # not a submodule: its layers are, above, under their own names
        self.prior: Prior = get_prior(config.prior)(config)
        self.likelihood: Likelihood = get_likelihood(config.likelihood)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.net.encode(x)

    def decode_hidden(self, z: Tensor) -> Tensor:
        """The input of the decoder's output layer (the `mlp`: relu(fc3(z))), where it ends in a Linear."""
        return self.net.decode_hidden(z)

    def decode_logits(self, z: Tensor) -> Tensor:
        return self.net.decode_logits(z)

    def decode(self, z: Tensor) -> Tensor:
        """Pixel means E[x|z] on [0, 1], under the model's likelihood."""
        return self.likelihood.mean(self.decode_logits(z))

    def forward(self, x: Tensor, eps: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(decoder logits, mu, log_std); `eps` makes the sample explicit and reproducible."""
        mu, log_std = self.encode(x)
        z = reparameterize(mu, log_std, eps)
        return self.decode_logits(z), mu, log_std

    def loss_terms(self, x: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
        """(reconstruction, KL term) per image (B,) for the sample z = mu + eps * std: what training sums."""
        mu, log_std = self.encode(x)
        z = reparameterize(mu, log_std, eps)
        return self.likelihood.recon_loss(self.decode_logits(z), x), self.prior.kl(mu, log_std, z)

    def fused_params(self) -> list[Tensor]:
        """The weights and biases the fused step takes, layer by layer in `MLPNetwork.LAYERS` order, found by name."""
        if not self.config.fusable:
            raise ValueError(f"no fused step for arch {self.config.arch!r} with prior {self.config.prior!r}")
        named = dict(self.named_parameters())
        return [named[f"{layer}.{p}"] for layer in MLPNetwork.LAYERS for p in ("weight", "bias")]

    def cluster_probs(self, x: Tensor) -> Tensor:
        """q(c|x) (B, K) of a mixture prior, at z = mu: the clusters the model itself assigns."""
        mu, _ = self.encode(x)
        return self.prior.responsibilities(mu)


def reparameterize(mu: Tensor, log_std: Tensor, eps: Tensor | None = None) -> Tensor:
    """z = mu + eps * exp(log_std), eps ~ N(0, I): differentiable in mu and log_std."""
    if eps is None:
        eps = torch.randn_like(mu)
    return mu + eps * torch.exp(log_std)


kl_divergence = kl_standard_normal  # KL(q(z|x) || N(0, I)) per image: the `normal` prior's term


def recon_loss(logits: Tensor, x: Tensor, likelihood: str) -> Tensor:
    """Reconstruction term per image, summed over pixels: the named likelihood's (see `likelihoods/`)."""
    return get_likelihood(likelihood).recon_loss(logits, x)


def log_likelihood(logits: Tensor, x: Tensor, likelihood: str) -> Tensor:
    """log p(x|z) in nats per image, under the named likelihood."""
    return get_likelihood(likelihood).log_prob(logits, x)


@dataclass(frozen=True)
class LossParts:
    loss: Tensor  # mean over the batch of recon + beta * kl
    recon: Tensor  # mean per image
    kl: Tensor  # mean per image


def vae_loss(logits: Tensor, x: Tensor, mu: Tensor, log_std: Tensor, likelihood: str, beta: float = 1.0) -> LossParts:
    """Reconstruction + beta * KL, summed over pixels and latents, averaged per image."""
    recon = recon_loss(logits, x, likelihood).mean()
    kl = kl_divergence(mu, log_std).mean()
    return LossParts(recon + beta * kl, recon, kl)


@torch.no_grad()
def elbo(model: VAE, x: Tensor, generator: torch.Generator | None = None, eps: Tensor | None = None) -> Tensor:
    """Single-sample ELBO per image in nats: log p(x|z) - KL term of the prior (Kingma & Welling 2014, eq. 10).

    The KL term is the prior's (`Prior.kl`): closed form for N(0, I), VaDE's for a mixture.
    `eps` (broadcast to (B, latent)) fixes the noise; one row for all images makes each score independent of the batch.
    """
    mu, log_std = model.encode(x)
    if eps is None:
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    z = reparameterize(mu, log_std, eps.expand_as(mu))
    return model.likelihood.log_prob(model.decode_logits(z), x) - model.prior.kl(mu, log_std, z)


@torch.no_grad()
def iwae_log_likelihood(
    model: VAE,
    x: Tensor,
    k: int,
    generator: torch.Generator | None = None,
    chunk: int = 4096,
    mm_dtype: torch.dtype | None = None,
) -> Tensor:
    """Importance-weighted bound on log p(x) per image (Burda, Grosse & Salakhutdinov 2016, eq. 8).

    log (1/k) sum_i p(x|z_i) p(z_i) / q(z_i|x), z_i ~ q(z|x), via logsumexp over the k
    samples of every image at once. The noise is one draw of shape (k, B, latent), so a
    generator seeded alike reproduces it. Samples are decoded in chunks of about `chunk`
    (sample, image) pairs, small enough for the logits to stay in cache. `mm_dtype` (e.g.
    bfloat16) runs the decoder's output matmul, most of the work, in that dtype.
    """
    mu, log_std = model.encode(x)  # (B, L)
    b, latent = mu.shape
    eps = torch.randn((k, b, latent), generator=generator, device=mu.device, dtype=mu.dtype)
    z = mu + eps * torch.exp(log_std)  # (k, B, L)
    if isinstance(model.prior, NormalPrior):
        # log p(z) - log q(z|x) = sum over latents of (eps^2 - z^2) / 2 + log_std: the log 2pi terms cancel, and
        # two passes over the (k, B, L) tensors replace seven
        log_pz_qz = eps.square_().sub_(z.square()).sum(-1).mul_(0.5).add_(log_std.sum(-1))  # (k, B); eps is spent
    else:
        log_pz_qz = model.prior.log_prob(z) - log_normal(z, mu, log_std)  # (k, B)
    per = max(1, chunk // b)
    out = model.net.output_layer()
    if out is not None:  # a Linear last layer: the fast path
        log_px = accel.iwae_log_px(model.likelihood, model.decode_hidden, out, x, z, per, mm_dtype)  # (k, B)
    else:
        logits = (model.decode_logits(zc) for zc in z.split(per))  # (n, B, D) each
        log_px = torch.cat([model.likelihood.log_prob(lc, x.expand_as(lc)) for lc in logits])
    return torch.logsumexp(log_px + log_pz_qz, dim=0) - math.log(k)
