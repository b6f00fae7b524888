"""The one plugin loader: the registries it builds, the names params.py reads from the files, and its errors."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

from vae_mlops import archs, likelihoods, params, plugins, priors
from vae_mlops.likelihoods import bernoulli

REGISTRIES = {"vae_mlops.likelihoods": likelihoods.LIKELIHOODS, "vae_mlops.archs": archs.ARCHS,
              "vae_mlops.priors": priors.PRIORS}  # fmt: skip


@pytest.mark.parametrize("package", REGISTRIES)
def test_the_names_from_the_files_are_the_registry_names(package):
    assert plugins.names(package) == tuple(REGISTRIES[package])


def test_params_accepts_exactly_the_registered_plugins():
    assert (params.LIKELIHOODS, params.ARCHS, params.PRIORS) == tuple(tuple(r) for r in REGISTRIES.values())


def test_validating_params_imports_no_plugin():
    """params.py must not import a plugin package: the download stage would depend on every model module."""
    code = (
        "import sys, vae_mlops.params; print(sorted(m for m in sys.modules if m.startswith(('vae_mlops.likelihoods', "
    )
    code += "'vae_mlops.archs', 'vae_mlops.priors', 'vae_mlops.model'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"importing vae_mlops.params imported {out}"


def test_a_plugin_not_named_after_its_module_is_refused(monkeypatch):
    monkeypatch.setattr(bernoulli, "LIKELIHOOD", types.SimpleNamespace(name="bern"))
    with pytest.raises(
        ValueError, match=r"vae_mlops\.likelihoods\.bernoulli\.LIKELIHOOD is named 'bern': name it 'bernoulli'"
    ):
        plugins.discover("vae_mlops.likelihoods", likelihoods.__path__, "LIKELIHOOD")


def test_an_unknown_name_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"unknown prior 'vamp': use one of gmm, normal"):
        priors.get_prior("vamp")
    assert likelihoods.get_likelihood("gaussian") is likelihoods.LIKELIHOODS["gaussian"]
