"""How far a long step is, in one line: done of total, time so far, time left (for logs, not only terminals)."""

from __future__ import annotations


def clock(seconds: float) -> str:
    """h:mm:ss."""
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def eta_note(done: int, total: int, seconds: float, unit: str, done_timed: int | None = None) -> str:
    """'300/1000 images (30%), 0:00:12 so far, about 0:00:28 left'.

    The time left is the mean time per unit of the `done_timed` units (default `done`) that took
    `seconds`, times the units to go: a resumed run counts only what it timed itself.
    """
    timed = done if done_timed is None else done_timed
    left = seconds / max(timed, 1) * max(total - done, 0)
    pct = 100 * done // max(total, 1)
    what = f"{done}/{total} {unit}".rstrip()
    return f"{what} ({pct}%), {clock(seconds)} so far, about {clock(left)} left"
