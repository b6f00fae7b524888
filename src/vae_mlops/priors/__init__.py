"""Every prior p(z) the VAE can use, by name: `PRIORS["gmm"]`.

Each module of this package (but `base`) defines one `PRIOR`, a `Prior` subclass, and the
registry is read from the package itself, as for `likelihoods/`: a new prior is a new module.
The legal values of `model.prior` in params.yaml are this registry's names.
"""

from __future__ import annotations

import importlib
import pkgutil

from vae_mlops.priors.base import Prior


def _discover() -> dict[str, type[Prior]]:
    found: dict[str, type[Prior]] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name == "base" or info.name.startswith("_"):
            continue
        prior = importlib.import_module(f"{__name__}.{info.name}").PRIOR
        found[prior.name] = prior
    return dict(sorted(found.items()))


PRIORS: dict[str, type[Prior]] = _discover()


def get_prior(name: str) -> type[Prior]:
    """The registered prior called `name`; a clear error naming the choices otherwise."""
    try:
        return PRIORS[name]
    except KeyError:
        raise ValueError(f"unknown prior {name!r}: use one of {', '.join(PRIORS)}") from None


__all__ = ["PRIORS", "Prior", "get_prior"]
