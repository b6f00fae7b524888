"""Every likelihood p(x|z) the VAE can use, by name: `LIKELIHOODS["bernoulli"]`.

Each module of this package (but `base`) defines one `LIKELIHOOD`, and the registry
is read from the package itself: a new likelihood is a new module and nothing else.
The legal values of `model.likelihood` in params.yaml are this registry's names.
"""

from __future__ import annotations

from vae_mlops import plugins
from vae_mlops.likelihoods.base import ExponentialFamily, Likelihood, softplus

LIKELIHOODS: dict[str, Likelihood] = plugins.discover(__name__, __path__, "LIKELIHOOD")


def get_likelihood(name: str) -> Likelihood:
    """The registered likelihood called `name`; a clear error naming the choices otherwise."""
    return plugins.pick(LIKELIHOODS, name, "likelihood")


__all__ = ["LIKELIHOODS", "ExponentialFamily", "Likelihood", "get_likelihood", "softplus"]
