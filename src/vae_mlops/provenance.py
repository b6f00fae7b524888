"""Where a run's code came from: the git commit, and whether the sources differ from it.

"Dirty" judges the sources (code, `params.yaml`, `dvc.yaml`, every other tracked file), never
what DVC writes: `dvc repro` deletes a stage's git-tracked outputs (say `reports/train_history.csv`)
before the stage runs and rewrites `dvc.lock` between stages, so counting them would call every
run from a fresh clone dirty.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

UNKNOWN = "unknown"
DVC_OUTPUT_KINDS = ("outs", "metrics", "plots")


def dvc_outputs(root: Path) -> list[str]:
    """The paths `dvc.yaml`'s stages write (outs, metrics, plots) as git glob pathspecs, plus `dvc.lock`.

    `${...}` interpolations become `*`: the exclusion then covers every value they take.
    """
    try:
        stages = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError):
        stages = {}
    paths = ["dvc.lock"]
    for stage in stages.values():
        for kind in DVC_OUTPUT_KINDS:
            for item in (stage or {}).get(kind) or []:
                paths += list(item) if isinstance(item, dict) else [str(item)]
    return [re.sub(r"\$\{[^}]*\}", "*", p).rstrip("/") for p in paths]


def git(root: Path, *args: str) -> str:
    """`git <args>` in `root`; its stdout, or `subprocess.CalledProcessError`."""
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=30).stdout


def git_head(root: Path) -> str:
    """The commit checked out in the repo holding `root`, or "unknown" outside git."""
    try:
        return git(root, "rev-parse", "HEAD").strip()
    except (OSError, subprocess.SubprocessError):
        return UNKNOWN


def git_state(root: Path) -> tuple[str, str]:
    """(commit, "true"/"false") where "true" means a tracked source differs from the commit; "unknown" outside git."""
    excluded = [f":(exclude,glob){p}" for q in dvc_outputs(root) for p in (q, f"{q}/**")]
    try:
        commit = git(root, "rev-parse", "HEAD").strip()
        changed = git(root, "status", "--porcelain", "--untracked-files=no", "--", ".", *excluded).strip()
    except (OSError, subprocess.SubprocessError):
        return UNKNOWN, UNKNOWN
    return commit, "true" if changed else "false"
