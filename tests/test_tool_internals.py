"""What the project takes from MLflow and DVC beyond their documented surface still exists in the pinned versions.

`mlflow<4` and `dvc<4` allow minor releases that move or drop internals. Every `from mlflow.x import y`
and `from dvc.x import y` in the code is resolved here, and the methods used on MLflow's system
metrics monitor (no public way logs a last sample at the end of a short run) are checked, so an
upgrade that breaks one fails here with the place that uses it, not in the middle of a training run.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

from tests.support.project import ROOT

SOURCES = [*sorted((ROOT / "src").rglob("*.py")), *sorted((ROOT / "pipeline").rglob("*.py"))]
TOOLS = ("mlflow", "dvc")


def tool_imports() -> list[tuple[str, str | None, str]]:
    """(module, name or None, where) for every import of MLflow or DVC in the package and `pipeline/`."""
    found = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in TOOLS and not node.level:
                found += [(node.module, alias.name, where) for alias in node.names]
            elif isinstance(node, ast.Import):
                found += [(alias.name, None, where) for alias in node.names if alias.name.split(".")[0] in TOOLS]
    return found


@pytest.mark.parametrize("module, name, where", tool_imports(), ids=lambda v: str(v))
def test_every_mlflow_and_dvc_name_the_code_imports_exists(module, name, where):
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        pytest.fail(f"{where}: the installed version has no module {module} ({exc}); use its public way", pytrace=False)
    if name is not None and not hasattr(mod, name):
        try:
            importlib.import_module(f"{module}.{name}")
        except ImportError:
            pytest.fail(f"{where}: the installed {module} has no {name}; use its public way", pytrace=False)


def test_the_system_metrics_monitor_still_has_what_runs_py_calls():
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    params = inspect.signature(SystemMetricsMonitor).parameters
    missing = [p for p in ("run_id", "sampling_interval", "tracking_uri") if p not in params]
    missing += [m for m in ("start", "finish", "collect_metrics", "aggregate_metrics", "publish_metrics")
                if not callable(getattr(SystemMetricsMonitor, m, None))]  # fmt: skip
    if "self.mlflow_logger" not in inspect.getsource(SystemMetricsMonitor.__init__):
        missing.append("mlflow_logger")
    assert not missing, (
        f"MLflow's SystemMetricsMonitor lost {missing}: vae_mlops/tracking/runs.py's start_system_metrics and "
        "stop_system_metrics need another way (mlflow.start_run(log_system_metrics=True) is the public one)"
    )


def test_the_check_finds_imports_of_the_tools(tmp_path: Path):
    assert any(module.startswith("mlflow") for module, _, _ in tool_imports())
