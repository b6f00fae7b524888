"""VaDE's initialisation (Jiang et al. 2017): train the network as an autoencoder, then fit the prior to its codes.

The encoder's mean head and the decoder are trained with z = mu and the likelihood's
reconstruction loss alone (no KL, no noise); then `Prior.initialise` fits the prior to
the codes of the training images (a diagonal GMM for `gmm`; N(0, I) has nothing to fit).
A deterministic function of (weights, data, seed), so every DDP rank computes the same.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import Tensor

from vae_mlops.model import VAE
from vae_mlops.params import TrainParams

log = logging.getLogger(__name__)

CODE_CHUNK = 1000  # images per forward pass when encoding the training set


def pretrain_autoencoder(model: VAE, x: Tensor, epochs: int, batch_size: int, lr: float, seed: int) -> list[float]:
    """`epochs` of Adam on the reconstruction of decode(mu(x)); returns the mean loss per image of each epoch."""
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for epoch in range(1, epochs + 1):
        t0, total = time.perf_counter(), 0.0
        for idx in torch.randperm(len(x), generator=g).to(x.device).split(batch_size):
            xb = x[idx]
            mu, _ = model.encode(xb)
            loss = model.likelihood.recon_loss(model.decode_logits(mu), xb).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        losses.append(total / len(x))
        seconds = time.perf_counter() - t0
        log.info("pretrain epoch %d/%d  autoencoder recon %.2f  %.2fs", epoch, epochs, losses[-1], seconds)
    return losses


@torch.no_grad()
def latent_codes(model: VAE, x: Tensor) -> Tensor:
    """mu(x) of every image (N, L), on the CPU."""
    model.eval()
    return torch.cat([model.encode(xb)[0].cpu() for xb in x.split(CODE_CHUNK)])


def initialise(model: VAE, x: Tensor, cfg: TrainParams) -> None:
    """Pretrain for `cfg.pretrain_epochs` (0: nothing) and fit the prior to the codes; weights are changed in place."""
    if cfg.pretrain_epochs == 0:
        return
    pretrain_autoencoder(model, x, cfg.pretrain_epochs, cfg.batch_size, cfg.lr, cfg.seed)
    model.prior.initialise(latent_codes(model, x), cfg.seed)
    model.train()
