"""The VAE of Kingma & Welling (2014): MLP encoder and decoder, losses, ELBO and IWAE.

The encoder outputs the mean and log standard deviation of a diagonal
Gaussian q(z|x); `log_std` is used everywhere (log-variance = 2 * log_std).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vae_mlops.likelihoods import Likelihood, get_likelihood

LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True)
class VAEConfig:
    """What rebuilds the network: stored in every checkpoint."""

    input_dim: int
    hidden_dim: int
    latent_dim: int
    likelihood: str  # a name in `likelihoods.LIKELIHOODS`

    def to_dict(self) -> dict:
        return asdict(self)


class VAE(nn.Module):
    """Encoder Linear(784, h) -> ReLU -> (mu, log_std); decoder Linear(l, h) -> ReLU -> Linear(h, 784)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.fc1 = nn.Linear(config.input_dim, config.hidden_dim)
        self.fc_mu = nn.Linear(config.hidden_dim, config.latent_dim)
        self.fc_log_std = nn.Linear(config.hidden_dim, config.latent_dim)
        self.fc3 = nn.Linear(config.latent_dim, config.hidden_dim)
        self.fc4 = nn.Linear(config.hidden_dim, config.input_dim)
        self.likelihood: Likelihood = get_likelihood(config.likelihood)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = F.relu(self.fc1(x))
        return self.fc_mu(h), self.fc_log_std(h)

    def decode_hidden(self, z: Tensor) -> Tensor:
        """relu(fc3(z)), the ReLU in place on fc3's fresh output: IWAE decodes k x B of these at once."""
        return self.fc3(z).relu_()

    def decode_logits(self, z: Tensor) -> Tensor:
        return self.fc4(self.decode_hidden(z))

    def decode(self, z: Tensor) -> Tensor:
        """Pixel means E[x|z] on [0, 1], under the model's likelihood."""
        return self.likelihood.mean(self.decode_logits(z))

    def forward(self, x: Tensor, eps: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(decoder logits, mu, log_std); `eps` makes the sample explicit and reproducible."""
        mu, log_std = self.encode(x)
        z = reparameterize(mu, log_std, eps)
        return self.decode_logits(z), mu, log_std


def reparameterize(mu: Tensor, log_std: Tensor, eps: Tensor | None = None) -> Tensor:
    """z = mu + eps * exp(log_std), eps ~ N(0, I): differentiable in mu and log_std."""
    if eps is None:
        eps = torch.randn_like(mu)
    return mu + eps * torch.exp(log_std)


def kl_divergence(mu: Tensor, log_std: Tensor) -> Tensor:
    """KL(q(z|x) || N(0, I)) per image, closed form (Kingma & Welling 2014, Appendix B)."""
    return 0.5 * (mu.pow(2) + torch.exp(2 * log_std) - 1 - 2 * log_std).sum(-1)


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


def log_normal(z: Tensor, mu: Tensor, log_std: Tensor) -> Tensor:
    """log N(z; mu, diag(exp(log_std)^2)), summed over the last dimension."""
    return (-0.5 * ((z - mu) * torch.exp(-log_std)).pow(2) - log_std - 0.5 * LOG_2PI).sum(-1)


@torch.no_grad()
def elbo(model: VAE, x: Tensor, generator: torch.Generator | None = None, eps: Tensor | None = None) -> Tensor:
    """Single-sample ELBO per image in nats: log p(x|z) - KL(q || p) (Kingma & Welling 2014, eq. 10).

    `eps` (broadcast to (B, latent)) fixes the noise; one row for all images makes each score independent of the batch.
    """
    mu, log_std = model.encode(x)
    if eps is None:
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    logits = model.decode_logits(reparameterize(mu, log_std, eps))
    return model.likelihood.log_prob(logits, x) - kl_divergence(mu, log_std)


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
    # log p(z) - log q(z|x) = sum over latents of (eps^2 - z^2) / 2 + log_std: the log 2pi terms cancel, and
    # two passes over the (k, B, L) tensors replace seven
    log_pz_qz = eps.square_().sub_(z.square()).sum(-1).mul_(0.5).add_(log_std.sum(-1))  # (k, B); eps is spent
    per = max(1, chunk // b)
    log_px = model.likelihood.iwae_log_px(model.decode_hidden, model.fc4, x, z, per, mm_dtype)  # (k, B)
    return torch.logsumexp(log_px + log_pz_qz, dim=0) - math.log(k)
