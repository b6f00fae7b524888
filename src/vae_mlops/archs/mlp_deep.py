"""A deeper MLP, hidden sizes as a list: VaDE's and DEC's 784-500-500-2000-l (Jiang et al. 2017; Xie et al. 2016)."""

from __future__ import annotations

from torch import Tensor, nn

from vae_mlops.archs.base import ArchConfig, Architecture, Network


def _stack(sizes: list[int]) -> nn.Sequential:
    """Linear -> ReLU between each pair of consecutive sizes."""
    layers: list[nn.Module] = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers)


class DeepMLPNetwork(Network):
    """Encoder D -> hidden_dims (ReLU) -> (mu, log_std); decoder l -> reversed hidden_dims (ReLU) -> D."""

    def __init__(self, input_dim: int, hidden_dims: tuple[int, ...], latent_dim: int) -> None:
        super().__init__()
        self.encoder = _stack([input_dim, *hidden_dims])
        self.fc_mu = nn.Linear(hidden_dims[-1], latent_dim)
        self.fc_log_std = nn.Linear(hidden_dims[-1], latent_dim)
        self.decoder = _stack([latent_dim, *reversed(hidden_dims)])
        self.fc_out = nn.Linear(hidden_dims[0], input_dim)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.encoder(x)
        return self.fc_mu(h), self.fc_log_std(h)

    def decode_hidden(self, z: Tensor) -> Tensor:
        return self.decoder(z)  # the last ReLU's output: a fresh tensor

    def output_layer(self) -> nn.Linear:
        return self.fc_out

    def decode_logits(self, z: Tensor) -> Tensor:
        return self.fc_out(self.decoder(z))


class DeepMLP(Architecture):
    name = "mlp-deep"
    uses_hidden_dims = True

    def build(self, config: ArchConfig) -> DeepMLPNetwork:
        if not config.hidden_dims:
            raise ValueError("model.hidden_dims: mlp-deep needs at least one hidden size, e.g. [500, 500, 2000]")
        return DeepMLPNetwork(config.input_dim, tuple(config.hidden_dims), config.latent_dim)


ARCH = DeepMLP()
