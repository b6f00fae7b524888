"""Waiting on a server process that a test started: its health URL answers, or the test fails with its log."""

from __future__ import annotations

import subprocess
from pathlib import Path

from pipeline import procs


def wait_until_answers(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    """Return once `url` answers 2xx; fail at once if `proc` exits, or after `timeout_s`, with the log's tail."""
    try:
        procs.wait_until(lambda: procs.http_ok(url), timeout_s, url, alive=lambda: proc.poll() is None)
    except procs.NotReady as exc:
        raise AssertionError(f"{exc} (exit code {proc.poll()}): {log.read_text(errors='replace')[-2000:]}") from None
