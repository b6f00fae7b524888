"""The PyTorch example's VAE: one hidden layer each way (784-h-l), the network the fused step (`accel`) computes."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from vae_mlops.archs.base import ArchConfig, Architecture, Network


class MLPNetwork(Network):
    """Encoder Linear(D, h) -> ReLU -> (mu, log_std); decoder Linear(l, h) -> ReLU -> Linear(h, D)."""

    # Every Linear layer, in the order the fused step's maths (`accel.elbo`) takes their weights: the one list
    # that the step, `VAE.fused_params` and the benchmarks read. A new layer goes here and into that maths.
    LAYERS = ("fc1", "fc_mu", "fc_log_std", "fc3", "fc4")

    def __init__(self, input_dim: int, hidden_dim: int, latent_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.fc_mu = nn.Linear(hidden_dim, latent_dim)
        self.fc_log_std = nn.Linear(hidden_dim, latent_dim)
        self.fc3 = nn.Linear(latent_dim, hidden_dim)
        self.fc4 = nn.Linear(hidden_dim, input_dim)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = F.relu(self.fc1(x))
        return self.fc_mu(h), self.fc_log_std(h)

    def decode_hidden(self, z: Tensor) -> Tensor:
        """relu(fc3(z)), the ReLU in place on fc3's fresh output: IWAE decodes k x B of these at once."""
        return self.fc3(z).relu_()

    def output_layer(self) -> nn.Linear:
        return self.fc4

    def decode_logits(self, z: Tensor) -> Tensor:
        return self.fc4(self.decode_hidden(z))


class MLP(Architecture):
    name = "mlp"

    def build(self, config: ArchConfig) -> MLPNetwork:
        return MLPNetwork(config.input_dim, config.hidden_dim, config.latent_dim)


ARCH = MLP()
