"""Every encoder/decoder architecture the VAE can use, by name: `ARCHS["mlp"]`.

Each module of this package (but `base`) defines one `ARCH`, and the registry is read
from the package itself, as for `likelihoods/`: a new architecture is a new module.
The legal values of `model.arch` in params.yaml are this registry's names.
"""

from __future__ import annotations

import importlib
import pkgutil

from vae_mlops.archs.base import Architecture, Network


def _discover() -> dict[str, Architecture]:
    found: dict[str, Architecture] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name == "base" or info.name.startswith("_"):
            continue
        arch = importlib.import_module(f"{__name__}.{info.name}").ARCH
        found[arch.name] = arch
    return dict(sorted(found.items()))


ARCHS: dict[str, Architecture] = _discover()


def get_arch(name: str) -> Architecture:
    """The registered architecture called `name`; a clear error naming the choices otherwise."""
    try:
        return ARCHS[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}: use one of {', '.join(ARCHS)}") from None


__all__ = ["ARCHS", "Architecture", "Network", "get_arch"]
