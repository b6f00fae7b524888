"""A learnable mixture of K diagonal Gaussians, trained as VaDE (Jiang et al. 2017, "Variational Deep Embedding").

Generative process, as in the paper: c ~ Cat(pi), z | c ~ N(mu_c, diag(sigma_c^2)),
x | z ~ the model's likelihood. With the mean-field q(z, c|x) = q(z|x) q(c|x) and
q(z|x) = N(mu~, diag(sigma~^2)) from the encoder, the paper's ELBO for this prior is

  E_q[log p(x|z)]
  - 1/2 sum_c gamma_c sum_j (log sigma_cj^2 + sigma~_j^2 / sigma_cj^2 + (mu~_j - mu_cj)^2 / sigma_cj^2)
  + sum_c gamma_c log(pi_c / gamma_c) + 1/2 sum_j (1 + log sigma~_j^2)

(the log 2pi terms of log p(z|c) and of the entropy of q(z|x) cancel), where
gamma_c = q(c|x) is set to the posterior of the component given the sample z, which
maximises the ELBO in q(c|x) (their eq. 16, in arXiv:1611.05148):

  q(c|x) = p(c|z) = pi_c N(z; mu_c, sigma_c^2) / sum_c' pi_c' N(z; mu_c', sigma_c'^2).

`kl` returns the negative of everything after E_q[log p(x|z)]: KL(q(z, c|x) || p(z, c)).
The initialisation is the one the paper describes for its experiments: an autoencoder of
the same network is trained first (`train.pretrain_epochs`) and a diagonal GMM fitted to
its codes gives pi, mu_c and sigma_c (`initialise`, on the codes' groups: `code_partition`).
The ELBO's terms and the pretrained initialisation are also those of the authors' code
(github.com/slim1017/VaDE, `vae_loss` and `load_pretrain_weights`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vae_mlops.priors.base import Prior, PriorConfig, log_normal

VARIANCE_FLOOR = 1e-6  # added to each component's variance, as scikit-learn's reg_covar: no zero width


class GaussianMixturePrior(Prior):
    name = "gmm"
    mixture = True

    def __init__(self, config: PriorConfig) -> None:
        super().__init__()
        k, latent = config.n_components, config.latent_dim
        if k < 2:
            raise ValueError(f"model.n_components: the gmm prior needs at least 2 components, got {k}")
        self.n_components = k
        self.logits = nn.Parameter(torch.zeros(k))  # pi = softmax(logits): always a distribution
        self.mu = nn.Parameter(torch.randn(k, latent))  # (K, L); replaced by `initialise`
        self.log_std = nn.Parameter(torch.zeros(k, latent))

    def log_joint(self, z: Tensor) -> Tensor:
        """log pi_c + log N(z; mu_c, sigma_c^2) for every component, (..., L) -> (..., K)."""
        return F.log_softmax(self.logits, -1) + log_normal(z.unsqueeze(-2), self.mu, self.log_std)

    def log_prob(self, z: Tensor) -> Tensor:
        return torch.logsumexp(self.log_joint(z), -1)

    def responsibilities(self, z: Tensor) -> Tensor:
        return F.softmax(self.log_joint(z), -1)

    def kl(self, mu: Tensor, log_std: Tensor, z: Tensor) -> Tensor:
        log_gamma = F.log_softmax(self.log_joint(z), -1)  # (B, K), q(c|x) = p(c|z)
        return vade_kl(mu, log_std, log_gamma, F.log_softmax(self.logits, -1), self.mu, self.log_std)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        pi = F.softmax(self.logits.detach().float().cpu(), -1)
        c = torch.multinomial(pi, n, replacement=True, generator=generator)
        return self.sample_component(c, generator)

    def sample_component(self, c: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """z ~ N(mu_c, sigma_c^2) for each component index in `c` (n,): the per-cluster sample grid."""
        eps = torch.randn((len(c), self.mu.shape[1]), generator=generator).to(self.mu)
        c = c.to(self.mu.device)
        return self.mu[c] + eps * self.log_std[c].exp()

    @torch.no_grad()
    def initialise(self, codes: Tensor, groups: Tensor | None) -> None:
        """pi, mu_c, sigma_c: the diagonal GMM fitted to the autoencoder's codes (N, L) given their groups (N,).

        Each component takes the share, mean and per-dimension variance of one group: the maximum-likelihood
        GMM given hard assignments. EM from there (scikit-learn's `GaussianMixture`) would raise the codes'
        likelihood but loses how well the components hold the digits: 0.04 to 0.07 accuracy on the k-means
        groups of 20- to 30-epoch autoencoders' codes (docs/models.md).
        """
        if groups is None:
            raise ValueError("the gmm prior is initialised from grouped codes: pass one group per code")
        points = codes.detach().cpu().double().numpy()
        resp = np.eye(self.n_components)[groups.cpu().numpy()]  # (N, K) hard responsibilities
        counts = resp.sum(0) + 10 * np.finfo(float).eps  # as scikit-learn's M-step: an empty group divides by no 0
        means = resp.T @ points / counts[:, None]
        variances = resp.T @ points**2 / counts[:, None] - means**2
        self.logits.copy_(torch.from_numpy(np.log(counts / counts.sum())))
        self.mu.copy_(torch.from_numpy(means))
        self.log_std.copy_(torch.from_numpy(0.5 * np.log(np.maximum(variances, 0) + VARIANCE_FLOOR)))


def vade_kl(
    mu: Tensor, log_std: Tensor, log_gamma: Tensor, log_pi: Tensor, mu_c: Tensor, log_std_c: Tensor
) -> Tensor:
    """KL(q(z, c|x) || p(z, c)) per image in closed form given q(c|x) = exp(log_gamma) (the ELBO's terms above).

    mu, log_std (B, L); log_gamma (B, K); log_pi (K,); mu_c, log_std_c (K, L).
    """
    var_ratio = torch.exp(2 * (log_std.unsqueeze(1) - log_std_c))  # (B, K, L) sigma~^2 / sigma_c^2
    dist = ((mu.unsqueeze(1) - mu_c) * torch.exp(-log_std_c)).square()  # (B, K, L)
    cross = (log_std_c + 0.5 * (var_ratio + dist)).sum(-1)  # (B, K): -E_q[log p(z|c)] less 1/2 L log 2pi
    gamma = log_gamma.exp()
    entropy_z = (0.5 + log_std).sum(-1)  # H(q(z|x)) less 1/2 L log 2pi
    return (gamma * (cross + log_gamma - log_pi)).sum(-1) - entropy_z


PRIOR = GaussianMixturePrior
