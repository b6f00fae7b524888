"""Every encoder/decoder architecture the VAE can use, by name: `ARCHS["mlp"]`.

Each module of this package (but `base`) defines one `ARCH`, and the registry is read
from the package itself, as for `likelihoods/`: a new architecture is a new module.
The legal values of `model.arch` in params.yaml are this registry's names.
"""

from __future__ import annotations

from vae_mlops import plugins
from vae_mlops.archs.base import Architecture, Network

ARCHS: dict[str, Architecture] = plugins.discover(__name__, __path__, "ARCH")


def get_arch(name: str) -> Architecture:
    """The registered architecture called `name`; a clear error naming the choices otherwise."""
    return plugins.pick(ARCHS, name, "architecture")


__all__ = ["ARCHS", "Architecture", "Network", "get_arch"]
