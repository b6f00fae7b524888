"""What an architecture owns: the layers of the encoder x -> (mu, log_std) and of the decoder z -> logits.

An architecture builds a `Network`; `model.VAE` registers the network's child modules
on itself under the network's own names, so a state_dict's keys are the layer names
(`fc1.weight` for the `mlp`, as model files have always had them).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

from torch import Tensor, nn


class ArchConfig(Protocol):
    """The fields of `model.VAEConfig` an architecture reads (the model imports the architectures, not back)."""

    input_dim: int
    hidden_dim: int
    latent_dim: int
    hidden_dims: tuple[int, ...]


class Network(nn.Module, ABC):
    """Encoder and decoder of one architecture; the likelihood turns the decoder's logits into p(x|z)."""

    @abstractmethod
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mu, log_std) of q(z|x), each (B, L), for images x (B, D) on [0, 1]."""

    @abstractmethod
    def decode_logits(self, z: Tensor) -> Tensor:
        """One logit per pixel, (..., D), for latents z (..., L)."""

    def output_layer(self) -> nn.Linear | None:
        """The decoder's last layer when it is a Linear on `decode_hidden`'s output: the IWAE fast path."""
        return None

    def decode_hidden(self, z: Tensor) -> Tensor:
        """The input of `output_layer`, a fresh tensor (the IWAE loop overwrites it)."""
        raise NotImplementedError(f"{type(self).__name__} has no linear output layer")


class Architecture(ABC):
    """One registered architecture: a name and a builder of its `Network` from a `VAEConfig`."""

    name: str
    uses_hidden_dims: bool = False  # whether `VAEConfig.hidden_dims` shapes the network

    @abstractmethod
    def build(self, config: ArchConfig) -> Network:
        """A freshly initialised network for `config`; a `ValueError` naming the field that does not fit."""

    def __repr__(self) -> str:
        return f"<architecture {self.name}>"
