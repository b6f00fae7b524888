"""Every use of DVC's internals, and nothing else: what DVC's public surface cannot tell.

`dvc.api` gives params and metrics, `dvc exp show --json` experiments and `dvc queue status` the queue, but
nothing public gives a stage as `dvc.yaml` declares it with its `${...}` interpolation resolved: its cmd, its
deps, its outs with their `cache` flag, and the params keys it declares. The hand-off checks need exactly
that, so it is read here through `Repo.index`, the only place in the project that imports DVC.
tests/test_tool_internals.py checks that these names still exist with the signatures used here.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dvc.dependency.param import ParamsDependency
from dvc.repo import Repo


def declared_stage(root: Path, stage: str) -> dict[str, Any]:
    """The stage as the checkout `root` declares it: cmd, deps (paths), outs (path, cached) and params.

    `params` is what `dvc.lock` records for the stage: {params file: {declared key: value in this checkout}}.
    """
    with Repo(str(root)) as repo:
        for st in repo.index.stages:
            if getattr(st, "name", None) == stage:
                return {
                    "cmd": st.cmd,
                    "deps": {str(dep.def_path) for dep in st.deps if not isinstance(dep, ParamsDependency)},
                    "outs": [(str(out.def_path), bool(out.use_cache)) for out in st.outs],
                    "params": {str(dep.def_path): _declared_values(dep.read_params(flatten=False), dep.params)
                               for dep in st.deps if isinstance(dep, ParamsDependency)},
                }  # fmt: skip
    raise ValueError(f"no stage '{stage}' in {root / 'dvc.yaml'}")


def _declared_values(raw: Mapping[str, Any], keys: list[str]) -> dict[str, Any]:
    """{declared key: its value}, a dotted key read through its sections, as `dvc.lock` records it.

    `raw` is the params file as DVC's own parser reads it, so values compare as DVC wrote them.
    """
    values = {}
    for key in keys:
        node: Any = raw
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        values[key] = node
    return values
