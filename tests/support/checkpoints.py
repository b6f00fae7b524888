"""Helpers for fault tests that kill training: find checkpoints, compare weights, wait on a process."""

from __future__ import annotations

import subprocess
from pathlib import Path

import torch

from pipeline import procs
from vae_mlops import checkpoint


def model_weights(path: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load_model(path)[0].state_dict()


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = model_weights(a), model_weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def wait_for(predicate, timeout: float = 120, proc: subprocess.Popen | None = None) -> None:
    """Return once `predicate()`; fail after `timeout`, or as soon as `proc` ends, with its output."""
    alive = (lambda: proc.poll() is None) if proc is not None else None
    try:
        procs.wait_until(predicate, timeout, "the process", alive, poll_s=0.02)
    except procs.NotReady as exc:
        out = proc.stdout.read() if proc is not None and proc.stdout and proc.poll() is not None else ""
        raise AssertionError(f"{exc}:\n{out}") from None


def checkpoints(repo: Path) -> list[Path]:
    return sorted((repo / "models" / "checkpoints").rglob("epoch-*.pt"))
