"""Waiting on a server process that a test started: its health URL answers, or the test fails with its log."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import requests


def wait_until_answers(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    """Return once `url` answers 2xx; fail at once if `proc` exits, or after `timeout_s`, with the log's tail."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited {proc.returncode}: {log.read_text(errors='replace')[-2000:]}"
        try:
            if requests.get(url, timeout=2).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} did not answer in {timeout_s}s: {log.read_text(errors='replace')[-2000:]}")
