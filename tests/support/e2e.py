"""Helpers for end-to-end tests: a temporary copy of the project, run with the real tools."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from pipeline import dvcrun, procs
from tests.support.mlflow_store import fresh_store
from tests.support.project import ROOT, tiny_raw_params


def copy_project(dest: Path, store: bool = True, **overrides) -> Path:
    """A fresh git + DVC repo holding the project's pipeline files and tiny params.

    `store` puts an empty, already-migrated `mlflow.db` in it (gitignored, as in a user's
    checkout after the first run): a new sqlite store spends seconds in MLflow's schema
    migrations, once per project. `store=False` leaves that to the first stage that logs.
    """
    dest.mkdir(parents=True, exist_ok=True)
    dvcrun.copy_pipeline(ROOT, dest)
    (dest / "params.yaml").write_text(yaml.safe_dump(tiny_raw_params(**overrides), sort_keys=False))
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=dest, check=True)
    if store:
        fresh_store(dest)
    return dest


def tool_env(**extra: str) -> dict[str, str]:
    """The environment a user's shell has after `make setup`: .venv/bin first on PATH, no telemetry."""
    return dvcrun.tool_env(extra)


def run(cmd: list[str], cwd: Path, env: dict | None = None, check: bool = True, timeout: float = 600):
    proc = subprocess.run(cmd, cwd=cwd, env=env or tool_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def dvc(*args: str, cwd: Path, env: dict | None = None, check: bool = True):
    return run([procs.venv_bin("dvc"), *args], cwd, env, check)
