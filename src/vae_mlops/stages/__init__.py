"""The pipeline's stages: each a function of (params, paths) -> files and metrics.

One definition of each stage, one module each; `cli.py` (what `dvc.yaml` runs)
and the Prefect flows in `pipeline/` are thin runners over these functions.
No argument parsing, tracking-URI setup or work at import time here: a runner
opens the MLflow run (`tracking.train_run`, `tracking.stage_run`) and passes it in.
`stages.train` and the others load their module on first use, so a process that
runs one stage does not import the libraries of the other three.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["download", "train", "evaluate", "register"]


def __getattr__(name: str) -> Any:
    """`stages.<stage>`: the stage function, its module imported now (PEP 562)."""
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{name}"), name)
