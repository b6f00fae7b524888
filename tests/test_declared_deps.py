"""Declared dependencies: pyproject names every package the code imports; requirements.in pins them; the lock agrees.

requirements.in holds the direct pins, requirements.txt the full lock `make setup` installs. The imports are read
from the source (ast), and mapped to their distributions by the installed metadata.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

from tests.support.project import ROOT

OWN = {"vae_mlops", "pipeline", "tests", "benchmarks"} | {p.stem for p in (ROOT / "tests").glob("*.py")}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"{path.name}: {line!r} is not an exact pin (name==version)"
            pins[_requirement_name(name)] = version.strip()
    return pins


def _requirement_name(spec: str) -> str:
    return _norm(re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0])


def _top_level_imports(folders: list[str]) -> set[str]:
    names: set[str] = set()
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names.update(a.name.split(".")[0] for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in OWN and n != "__future__"}


def _distributions(modules: set[str]) -> dict[str, set[str]]:
    """Import name -> the distributions that provide it (mlflow: mlflow, mlflow-skinny), from installed metadata."""
    table = packages_distributions()
    missing = sorted(m for m in modules if m not in table)
    assert not missing, f"imported but not installed (so not declared): {missing}"
    return {m: {_norm(d) for d in table[m]} for m in modules}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_pyproject_declares_every_package_the_code_imports():
    runtime = {_requirement_name(d) for d in _pyproject()["dependencies"]}
    used = _distributions(_top_level_imports(["src", "pipeline"]))
    missing = {m: d for m, d in used.items() if not d & runtime}
    assert not missing, f"add to pyproject.toml [project].dependencies: {missing}"


def test_the_test_extra_declares_what_the_tests_import_beyond_the_runtime():
    project = _pyproject()
    declared = {_requirement_name(d) for d in project["dependencies"]}
    declared |= {_requirement_name(d) for d in project["optional-dependencies"]["test"]}
    used = _distributions(_top_level_imports(["tests"]) | {"pytest_timeout"})  # a plugin: configured, not imported
    missing = {m: d for m, d in used.items() if not d & declared}
    assert not missing, f"add to pyproject.toml [project.optional-dependencies].test: {missing}"


def test_requirements_in_pins_every_declared_package_as_the_lock_does():
    project = _pyproject()
    declared = {_requirement_name(d) for d in [*project["dependencies"], *project["optional-dependencies"]["test"]]}
    direct, lock = _pins(ROOT / "requirements.in"), _pins(ROOT / "requirements.txt")
    assert declared == set(direct), (
        f"requirements.in and pyproject.toml name different packages: only in pyproject {sorted(declared - set(direct))}"
        f", only in requirements.in {sorted(set(direct) - declared)}"
    )
    differ = {n: (v, lock.get(n)) for n, v in direct.items() if lock.get(n) != v}
    assert not differ, f"requirements.in vs requirements.txt (the lock) pins (direct, lock): {differ}"


def test_the_lock_pins_what_is_installed():
    """`make setup` installs requirements.txt: a pin that differs from .venv means the lock was not regenerated."""
    from importlib.metadata import version

    direct = _pins(ROOT / "requirements.in")
    differ = {n: (v, version(n)) for n, v in direct.items() if version(n) != v}
    assert not differ, f"requirements.in pins vs installed (pin, installed): {differ}"
