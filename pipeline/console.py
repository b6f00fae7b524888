"""How the `pipeline` commands answer on the terminal: `name: value` lines, and `error: ...` with an exit status."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any


def fail(exc: BaseException, status: int = 2) -> int:
    """Say what went wrong (the error's message names what to do) on stderr; the command's exit status."""
    print(f"error: {exc}", file=sys.stderr)
    return status


def print_named(items: Mapping[str, Any]) -> None:
    """One `name: value` line each, for a reader and for a script's `cut -d:`."""
    for name, value in items.items():
        print(f"{name}: {value}")
