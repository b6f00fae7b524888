"""Helpers for fault tests that kill training: find checkpoints, compare weights, wait on a process."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import torch

from vae_mlops import checkpoint


def model_weights(path: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load_model(path)[0].state_dict()


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = model_weights(a), model_weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def wait_for(predicate, timeout: float = 120, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended early:\n{proc.stdout.read() if proc.stdout else ''}")
        time.sleep(0.02)
    raise AssertionError("timed out waiting")


def checkpoints(repo: Path) -> list[Path]:
    return sorted((repo / "models" / "checkpoints").rglob("epoch-*.pt"))
