"""Every likelihood p(x|z) the VAE can use, by name: `LIKELIHOODS["bernoulli"]`.

Each module of this package (but `base`) defines one `LIKELIHOOD`, and the registry
is read from the package itself: a new likelihood is a new module and nothing else.
The legal values of `model.likelihood` in params.yaml are this registry's names.
"""

from __future__ import annotations

import importlib
import pkgutil

from vae_mlops.likelihoods.base import ExponentialFamily, Likelihood, softplus


def _discover() -> dict[str, Likelihood]:
    found: dict[str, Likelihood] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name == "base" or info.name.startswith("_"):
            continue
        likelihood = importlib.import_module(f"{__name__}.{info.name}").LIKELIHOOD
        found[likelihood.name] = likelihood
    return dict(sorted(found.items()))


LIKELIHOODS: dict[str, Likelihood] = _discover()


def get_likelihood(name: str) -> Likelihood:
    """The registered likelihood called `name`; a clear error naming the choices otherwise."""
    try:
        return LIKELIHOODS[name]
    except KeyError:
        raise ValueError(f"unknown likelihood {name!r}: use one of {', '.join(LIKELIHOODS)}") from None


__all__ = ["LIKELIHOODS", "ExponentialFamily", "Likelihood", "get_likelihood", "softplus"]
