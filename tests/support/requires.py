"""Tests that need a real component (Chromium, PostgreSQL, the real MNIST files).

On a developer's machine without it such a test is skipped, saying what is missing; in CI (`CI=true`,
which `.ci/run` exports) it fails with the same message: CI must test everything, not pass by testing less.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.project import ROOT


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require(present: bool, what: str, how: str) -> None:
    """Skip (a developer's machine) or fail (CI) unless `present`; `what` is missing, `how` gets it."""
    if present:
        return
    message = f"{what} is missing: {how}"
    if in_ci():
        pytest.fail(f"{message} (CI=true: a test that needs it fails instead of skipping)", pytrace=False)
    pytest.skip(message)


def real_mnist_mirror() -> Path:
    """The offline MNIST copy: `VAE_DATA_MIRROR` as CI sets it (a folder or file:// URL), else ../shared/data/mnist."""
    mirror = os.environ.get("VAE_DATA_MIRROR", "").strip()
    if mirror.startswith("file://"):
        mirror = mirror.removeprefix("file://")
    return Path(mirror) if mirror and "://" not in mirror else ROOT.parent / "shared" / "data" / "mnist"
