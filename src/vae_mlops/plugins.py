"""The one plugin loader: a package whose modules each define one plugin, found by name at import.

`likelihoods/`, `priors/` and `archs/` use it: a new likelihood, prior or architecture is a new module
in its folder and nothing else. A plugin is named after its module (`mlp_deep.py` holds `mlp-deep`), so
`params.py` learns the legal names from the file names alone and validating params runs no model code
(the download stage does not depend on the likelihoods).
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def _plugin_modules(path: Iterable[str]) -> list[str]:
    return sorted(i.name for i in pkgutil.iter_modules(path) if i.name != "base" and not i.name.startswith("_"))


def plugin_name(module: str) -> str:
    """The name a plugin in module `module` must have: the module's, `-` for `_`."""
    return module.replace("_", "-")


def discover(package: str, path: Iterable[str], attr: str) -> dict[str, Any]:
    """{plugin.name: plugin} of each module of `package` (but `base` and `_private` ones), sorted by name.

    Args:
        package: the package's `__name__`; path: its `__path__`; attr: the name each module binds its plugin to.
    """
    found: dict[str, Any] = {}
    for module in _plugin_modules(path):
        plugin = getattr(importlib.import_module(f"{package}.{module}"), attr)
        if plugin.name != plugin_name(module):
            raise ValueError(
                f"{package}.{module}.{attr} is named {plugin.name!r}: name it {plugin_name(module)!r} "
                "after its module (or rename the module), so params.py can list it without importing it"
            )
        found[plugin.name] = plugin
    return dict(sorted(found.items()))


def names(package: str) -> tuple[str, ...]:
    """The plugin names of `package` from its module files, without importing the package or its plugins."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"{package} is not a package of plugins")
    return tuple(sorted(plugin_name(m) for m in _plugin_modules(spec.submodule_search_locations)))


def pick(registry: Mapping[str, T], name: str, kind: str) -> T:
    """The registered `kind` called `name`; a clear error naming the choices otherwise."""
    try:
        return registry[name]
    except KeyError:
        raise ValueError(f"unknown {kind} {name!r}: use one of {', '.join(registry)}") from None
