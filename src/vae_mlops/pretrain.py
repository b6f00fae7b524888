"""VaDE's initialisation (Jiang et al. 2017): train the network as an autoencoder, then fit the prior to its codes.

From Glorot-uniform weights, the encoder's mean head and the decoder are trained with z = mu and the likelihood's
reconstruction loss alone (no KL, no noise); then, for a mixture prior, the codes of the
training images are grouped (`train.pretrain_partition`, `code_partition`) and
`Prior.initialise` fits the prior to the codes and their groups (a diagonal GMM for
`gmm`; N(0, I) has nothing to fit).
A deterministic function of (weights, data, seed), so every DDP rank computes the same.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import Tensor, nn

from vae_mlops.code_partition import partition_codes
from vae_mlops.model import VAE
from vae_mlops.params import TrainParams

log = logging.getLogger(__name__)

CODE_CHUNK = 1000  # images per forward pass when encoding the training set


def glorot_initialise(model: VAE, seed: int) -> None:
    """Glorot-uniform weights and zero biases in every dense and convolutional layer: Keras' defaults, from which
    the VaDE and DEC autoencoders were pretrained. Torch's defaults are narrower (Kaiming-uniform with a = sqrt(5))."""
    g = torch.Generator().manual_seed(seed)
    for layer in model.modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.xavier_uniform_(layer.weight, generator=g)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


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
    glorot_initialise(model, cfg.seed)
    pretrain_autoencoder(model, x, cfg.pretrain_epochs, cfg.pretrain_batch_size, cfg.pretrain_lr, cfg.seed)
    codes = latent_codes(model, x)
    groups = None
    if model.prior.n_components:
        t0 = time.perf_counter()
        found = partition_codes(codes.double().numpy(), model.prior.n_components, cfg.pretrain_partition, cfg.seed)
        groups = torch.from_numpy(found)
        log.info("%s grouped %d codes in %d clusters in %.1fs", cfg.pretrain_partition, len(codes),
                 model.prior.n_components, time.perf_counter() - t0)  # fmt: skip
    model.prior.initialise(codes, groups)
    model.train()
