"""MLflow's and DVC's internals stay behind one door per tool, and what is behind it still exists.

`mlflow<4` and `dvc<4` allow minor releases that move or drop anything outside the documented surface.
The code imports only the tools' public modules, except in one adapter module per tool
(`tracking/mlflow_internals.py`, `pipeline/dvc_internals.py`); every name an adapter imports is checked
here against the installed version (the parameters and members it uses), and the adapters are run, so an
upgrade that breaks one fails here naming it, not in the middle of a training run or a hand-off.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import re
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from pipeline import dvc_internals
from tests.support.e2e import copy_project
from tests.support.project import ROOT
from vae_mlops.tracking import mlflow_internals

SOURCES = [*sorted((ROOT / "src").rglob("*.py")), *sorted((ROOT / "pipeline").rglob("*.py")),
           *sorted((ROOT / "benchmarks").rglob("*.py"))]  # fmt: skip
TOOLS = ("mlflow", "dvc")
ADAPTERS = {"mlflow": ROOT / "src/vae_mlops/tracking/mlflow_internals.py", "dvc": ROOT / "pipeline/dvc_internals.py"}

# The modules each tool documents as its Python API (mlflow.org's API reference; dvc.org's "Python API" is
# `dvc.api` alone). `mlflow.server.auth` is public through the `authorization_function` setting its
# basic_auth.ini documents; `mlflow.tracking` is where the documented `MlflowClient` lives.
PUBLIC = {
    "mlflow": {"mlflow", "mlflow.artifacts", "mlflow.client", "mlflow.data", "mlflow.entities", "mlflow.exceptions",
               "mlflow.environment_variables", "mlflow.models", "mlflow.pyfunc", "mlflow.server.auth",
               "mlflow.tracking", "mlflow.types"},
    "dvc": {"dvc.api"},
}  # fmt: skip

# Each internal name an adapter imports -> ({callable: parameters the adapter passes}) for it and its members.
# "" is the name itself; a member with None is an attribute (or property) only.
EXPECTED: dict[tuple[str, str], dict[str, tuple[str, ...] | None]] = {
    ("mlflow.system_metrics.system_metrics_monitor", "SystemMetricsMonitor"): {
        "": ("run_id", "sampling_interval", "tracking_uri"),
        "start": (), "finish": (), "collect_metrics": (), "aggregate_metrics": (), "publish_metrics": ("metrics",),
    },
    ("mlflow.store.artifact.models_artifact_repo", "ModelsArtifactRepository"): {
        "is_models_uri": ("uri",), "get_underlying_uri": ("uri",),
    },
    ("mlflow.store.artifact.runs_artifact_repo", "RunsArtifactRepository"): {
        "is_runs_uri": ("uri",), "get_underlying_uri": ("runs_uri",),
    },
    ("mlflow.pyfunc", "scoring_server"): {"init": ("model",), "load_model_with_mlflow_config": ("model_uri",)},
    ("dvc.repo", "Repo"): {"": ("root_dir",), "index": None, "__enter__": (), "__exit__": ()},
    ("dvc.dependency.param", "ParamsDependency"): {"read_params": ("flatten",)},
}  # fmt: skip


def _resolved(module: str, name: str | None) -> str:
    """The module an import names: `from mlflow.pyfunc import scoring_server` names mlflow.pyfunc.scoring_server."""
    if name is not None:
        try:
            if importlib.util.find_spec(f"{module}.{name}") is not None:
                return f"{module}.{name}"
        except ImportError:
            pass
    return module


def tool_imports(paths: list[Path] = SOURCES) -> list[tuple[str, str | None, str, Path]]:
    """(module, name or None, where, file) for every import of MLflow or DVC in the given files."""
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{getattr(node, 'lineno', 0)}"
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.split(".")[0] in TOOLS
                and not node.level
            ):
                found += [(node.module, alias.name, where, path) for alias in node.names]
            elif isinstance(node, ast.Import):
                found += [(alias.name, None, where, path) for alias in node.names if alias.name.split(".")[0] in TOOLS]
    return found


def is_public(module: str, name: str | None) -> bool:
    return _resolved(module, name) in PUBLIC[module.split(".")[0]]


def internals_outside_adapters(paths: list[Path] = SOURCES) -> list[str]:
    """'file:line: what' for each import of a tool's internals outside that tool's adapter module."""
    return [f"{where}: {module}{'.' + name if name else ''} is not {module.split('.')[0]}'s public API"
            for module, name, where, path in tool_imports(paths)
            if not is_public(module, name) and path != ADAPTERS[module.split(".")[0]]]  # fmt: skip


def test_tools_internals_are_used_only_in_their_adapter_module():
    found = internals_outside_adapters()
    assert not found, (
        "internals of MLflow or DVC used outside their adapter module:\n  " + "\n  ".join(found) + "\n"
        "Use the tool's public way (see PUBLIC in this test), or move the call into a function of "
        f"{', '.join(str(p.relative_to(ROOT)) for p in ADAPTERS.values())} (one per tool) and call that."
    )


@pytest.mark.parametrize("tool", TOOLS)
def test_each_adapter_holds_internals_only_and_each_is_checked(tool):
    imports = tool_imports([ADAPTERS[tool]])
    public = [f"{where}: {m}.{n}" for m, n, where, _ in imports if is_public(m, n)]
    unchecked = [f"{where}: {m}.{n}" for m, n, where, _ in imports if not is_public(m, n) and (m, n) not in EXPECTED]
    assert not public, f"the {tool} adapter imports public names; use them where they are needed: {public}"
    assert not unchecked, f"add the {tool} adapter's new internals to EXPECTED in this test: {unchecked}"
    assert any(m.startswith(tool) for m, *_ in imports), f"the {tool} adapter imports nothing of {tool}"


@pytest.mark.parametrize("module, name", EXPECTED, ids=lambda v: str(v))
def test_each_internal_the_adapters_call_exists_with_its_parameters(module, name):
    users = [str(p.relative_to(ROOT)) for p in ADAPTERS.values() if re.search(rf"import .*\b{name}\b", p.read_text())]
    who = f"the use of {module}.{name} in {', '.join(users)}"
    try:
        target = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        pytest.fail(f"the installed version has no {module}.{name} ({exc}): rewrite {who}", pytrace=False)
    problems = []
    for member, params in EXPECTED[(module, name)].items():
        obj = target if not member else inspect.getattr_static(target, member, None)
        if obj is None:
            problems.append(f"no member {member!r}")
            continue
        if params is None:
            continue
        fn = obj.__func__ if isinstance(obj, (staticmethod, classmethod)) else obj
        signature = inspect.signature(fn.__init__ if inspect.isclass(fn) else fn)
        problems += [f"{member or name}() has no parameter {p!r}" for p in params if p not in signature.parameters]
    assert not problems, f"the installed {module}.{name} changed: {problems}; rewrite {who}"


def test_the_dvc_adapter_reads_each_stage_as_dvc_yaml_declares_it(tmp_path):
    root = copy_project(tmp_path / "p", store=False)
    raw = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((root / "params.yaml").read_text())

    def render(path: str) -> str:  # dvc.yaml's `${section.key}`, from params.yaml
        return re.sub(r"\$\{(\w+)\.([\w-]+)\}", lambda m: str(params[m[1]][m[2]]), path)

    for name, stage in raw.items():
        got = dvc_internals.declared_stage(root, name)
        assert got["cmd"] == stage["cmd"], name
        assert got["deps"] == {render(d) for d in stage.get("deps", [])}, name
        outs = [(render(next(iter(o))), next(iter(o.values())).get("cache", True)) if isinstance(o, dict)
                else (render(o), True) for kind in ("outs", "metrics", "plots") for o in stage.get(kind, [])]  # fmt: skip
        assert sorted(got["outs"]) == sorted(outs), name  # metrics and plots are outputs too
        keys = stage.get("params", [])
        assert set(got["params"].get("params.yaml", {})) == set(keys), name
        for key in keys:
            section, _, field = key.partition(".")  # a key, or a whole section
            assert got["params"]["params.yaml"][key] == (params[section][field] if field else params[section]), key
    with pytest.raises(ValueError, match="no stage 'nope'"):
        dvc_internals.declared_stage(root, "nope")


def test_the_system_metrics_adapter_logs_a_sample_for_a_run_shorter_than_its_interval(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("x"))
    monitor = mlflow_internals.start_system_metrics(run.info.run_id, uri, interval_s=600.0)
    assert monitor is not None
    mlflow_internals.stop_system_metrics(monitor)
    metrics = client.get_run(run.info.run_id).data.metrics
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(metrics)


def test_the_check_names_the_line_of_an_internal_and_lets_public_imports_pass(tmp_path):
    module = tmp_path / "stage.py"
    module.write_text("import mlflow\nfrom dvc.api import params_show\nfrom dvc.repo import Repo\n"
                      "from mlflow.pyfunc import scoring_server\nimport mlflow.store.artifact\n")  # fmt: skip
    found = internals_outside_adapters([module])
    assert found == [f"{module}:3: dvc.repo.Repo is not dvc's public API",
                     f"{module}:4: mlflow.pyfunc.scoring_server is not mlflow's public API",
                     f"{module}:5: mlflow.store.artifact is not mlflow's public API"]  # fmt: skip
