"""Waiting for an exclusive `flock`: the one way the project takes a lock another process may hold.

`flock` is released by the kernel when its holder dies, so a killed holder never leaves a lock stuck.
"""

from __future__ import annotations

import fcntl
import time
from typing import IO


def wait_flock(file: int | IO, timeout_s: float, poll_s: float) -> bool:
    """Take an exclusive `flock` on `file`, polling every `poll_s` for up to `timeout_s`; False if it stayed held."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(poll_s)
