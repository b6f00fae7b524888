"""Processes the runners start: this venv's tools, stopping a process group, waiting for a server to answer.

One home for each, used by `pipeline/` and by the tests' helpers (`tests/support/`).
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from vae_mlops.errors import VaeMlopsError


class NotReady(VaeMlopsError):
    """A server did not answer in time, or its process exited while starting."""


def venv_bin(name: str) -> str:
    """`name` from this interpreter's venv (`.venv/bin/dvc`), else `name` as found on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def group_alive(pgid: int) -> bool:
    """Any live (not zombie) process left in process group `pgid`."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # zombies of a group whose leader we are not the parent of are reaped by init: treat them as gone
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def stop_process_group(proc: subprocess.Popen | int, grace_s: float = 10.0, first: int = signal.SIGTERM) -> None:
    """Send `first` (SIGTERM) to the process group led by `proc` (a child, or a leader's pid), SIGKILL what is left
    after `grace_s`.

    The group goes, not only its leader: a server's workers and a command's children end with it.
    """
    child = proc if isinstance(proc, subprocess.Popen) else None
    pgid = child.pid if child is not None else int(proc)
    for sig, wait_s in ((first, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if child is not None and child.poll() is None:
                time.sleep(0.05)
            elif group_alive(pgid):
                time.sleep(0.1)
            else:
                break
        if not group_alive(pgid):
            break
    if child is not None and child.poll() is None:
        child.wait(10)


def http_status(url: str, basic_auth: str | None = None, method: str = "GET", timeout_s: float = 10.0) -> int | None:
    """The HTTP status `url` answers (`basic_auth` is "user:password"; a POST sends `{}`); None when nothing answers."""
    request = urllib.request.Request(url, method=method, data=b"{}" if method == "POST" else None,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    if basic_auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(basic_auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):  # refused, reset, timed out; a malformed URL
        return None


def http_ok(url: str, timeout_s: float = 2.0) -> bool:
    """GET `url` answers 2xx."""
    status = http_status(url, timeout_s=timeout_s)
    return status is not None and 200 <= status < 300


def wait_until(
    ready: Callable[[], bool],
    timeout_s: float,
    what: str,
    alive: Callable[[], bool] | None = None,
    poll_s: float = 0.3,
) -> None:
    """Return once `ready()`; `NotReady` after `timeout_s`, or at once when `alive()` says the process exited."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if alive is not None and not alive():
            raise NotReady(f"{what} exited while starting")
        if time.monotonic() > deadline:
            raise NotReady(f"{what} did not answer within {timeout_s:.0f}s")
        time.sleep(poll_s)
