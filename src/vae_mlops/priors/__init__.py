"""Every prior p(z) the VAE can use, by name: `PRIORS["gmm"]`.

Each module of this package (but `base`) defines one `PRIOR`, a `Prior` subclass, and the
registry is read from the package itself, as for `likelihoods/`: a new prior is a new module.
The legal values of `model.prior` in params.yaml are this registry's names.
"""

from __future__ import annotations

from vae_mlops import plugins
from vae_mlops.priors.base import Prior

PRIORS: dict[str, type[Prior]] = plugins.discover(__name__, __path__, "PRIOR")


def get_prior(name: str) -> type[Prior]:
    """The registered prior called `name`; a clear error naming the choices otherwise."""
    return plugins.pick(PRIORS, name, "prior")


__all__ = ["PRIORS", "Prior", "get_prior"]
