"""`make sweep`: a grid of DVC experiments, queued with DVC's own grid syntax and run to completion.

    python -m pipeline.sweep [KEY=V1,V2,... ...] [--jobs N] [--root PATH]

Each `KEY=V1,V2,...` is one axis of the grid (values read as YAML, as `-S` reads them); the grid is
every combination. With no axes, the default grid: model.latent_dim in {2, 10, 20} x
model.likelihood in {bernoulli, gaussian}. Every point is validated first (one error lists every
bad value, nothing is queued); then it is DVC's public commands only:

    dvc exp run --queue -S 'model.latent_dim=2,10' -S ...   # DVC queues one experiment per point
    dvc queue start --jobs N                                 # its workers run them in temporary copies
    dvc queue status                                         # polled until none of ours is queued or running
    dvc exp show --json                                      # each experiment's end: success or failed
    dvc queue stop                                           # the workers go once the queue is done

and the command exits non-zero when any experiment of the sweep failed.

Each experiment's MLflow run lands in the workspace's store, named and tagged (`dvc.experiment`) after
the experiment (see `vae_mlops.tracking.store.workspace_root`), so `dvc exp show` and the MLflow UI list
the same runs; `make history` shows every registration decision.
"""

from __future__ import annotations

import argparse
import ast
import itertools
import json
import logging
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import console, dvcrun
from vae_mlops import cli_args
from vae_mlops.errors import VaeMlopsError
from vae_mlops.params import ParamsError, load_params, parse_set_args

CHECKOUT = Path(__file__).resolve().parents[1]  # the checkout holding this code
DEFAULT_GRID = ("model.latent_dim=2,10,20", "model.likelihood=bernoulli,gaussian")
# what `dvc exp run --queue` prints for each point of a grid: its overrides, then its name
OVERRIDES_RE = re.compile(r"Queueing with overrides '(\{.*\})'\.")
QUEUED_RE = re.compile(r"Queued experiment '([^']+)' for future execution")
QUEUE_TIMEOUT_S = 600.0  # queueing the grid: a git stash round trip per point
RUN_TIMEOUT_S = 7 * 24 * 3600.0  # the queue itself: bounded by the experiments, not by us
POLL_S = 5.0
COMMAND_TIMEOUT_S = 120.0  # one `dvc queue status` or `dvc exp show`


class SweepError(VaeMlopsError):
    """The grid is malformed, or a point could not be queued: nothing of the sweep ran."""


class ExperimentsFailed(VaeMlopsError):
    """The sweep ran, and some of its experiments did not succeed (the others are kept)."""


@dataclass(frozen=True)
class Point:
    """One grid point: its `-S` pairs as written (for DVC) and as typed values (for validation)."""

    pairs: tuple[str, ...]

    @property
    def overrides(self) -> dict[str, Any]:
        return parse_set_args(list(self.pairs))

    def __str__(self) -> str:
        return " ".join(self.pairs)


def parse_grid(axes: list[str]) -> list[Point]:
    """`["model.latent_dim=2,10", "model.likelihood=bernoulli"]` -> the product of the axes, in order."""
    problems: list[str] = []
    values: dict[str, list[str]] = {}
    for axis in axes:
        key, sep, raw = axis.partition("=")
        key = key.strip()
        choices = [v.strip() for v in raw.split(",")]
        if not sep or not key:
            problems.append(f"{axis!r}: expected KEY=V1,V2,... (e.g. model.latent_dim=2,10,20)")
        elif not all(choices):
            problems.append(f"{axis!r}: an empty value; separate values with single commas")
        elif key in values:
            problems.append(f"{key}: given twice; put all its values in one KEY=V1,V2,...")
        else:
            values[key] = list(dict.fromkeys(choices))
    if problems:
        raise SweepError("the sweep grid is malformed:\n" + "\n".join(f"  - {p}" for p in problems))
    combos = itertools.product(*([f"{k}={v}" for v in vs] for k, vs in values.items()))
    return [Point(tuple(c)) for c in combos]


def validate(root: Path, points: list[Point]) -> None:
    """Every point against params.yaml's schema; one `ParamsError` listing each bad point's problems."""
    params_file = root / "params.yaml"
    problems: list[str] = []
    for point in points:
        try:
            load_params(params_file, point.overrides, source=str(point))
        except ParamsError as exc:
            problems += [f"{point}: {p}" for p in exc.problems]
    if problems:
        raise ParamsError(problems, f"the sweep grid (against {params_file})")


def dvc(root: Path, logger, *args: str, timeout_s: float = COMMAND_TIMEOUT_S) -> list[str]:
    """`dvc <args>` in `root`, its output logged; `dvcrun.CommandFailed` if it fails."""
    return dvcrun.run_logged([dvcrun.dvc_bin(), *args], root, logger, timeout_s)


def start_workers(root: Path, jobs: int, logger) -> None:
    """`dvc queue start --jobs N`. Its workers are daemons that keep the command's stdout open, so the output
    goes through a file, and the command is done when it exits (not when its output ends)."""
    cmd = [dvcrun.dvc_bin(), "queue", "start", "--jobs", str(jobs)]
    with tempfile.TemporaryFile("w+") as out:
        try:
            proc = subprocess.run(cmd, cwd=root, env=dvcrun.tool_env(), stdout=out, stderr=subprocess.STDOUT,
                                  timeout=COMMAND_TIMEOUT_S)  # fmt: skip
        except subprocess.TimeoutExpired:
            raise SweepError(f"`{' '.join(cmd)}` did not return in {COMMAND_TIMEOUT_S:.0f} s") from None
        out.seek(0)
        lines = out.read().splitlines()
    for line in lines:
        logger.info(line)
    if proc.returncode != 0:
        raise SweepError(f"`{' '.join(cmd)}` failed with exit code {proc.returncode}:\n" + "\n".join(lines[-10:]))


def quiet() -> logging.Logger:
    """Where the output of polling commands goes: not shown (the sweep logs what changed)."""
    logger = logging.getLogger(f"{__name__}.poll")
    logger.setLevel(logging.WARNING)
    return logger


def grid_axes(points: list[Point]) -> list[str]:
    """The points as DVC's grid syntax, one `KEY=V1,V2,...` per axis (values as validated, once each)."""
    values: dict[str, list[str]] = {}
    for point in points:
        for pair in point.pairs:
            key, _, value = pair.partition("=")
            values.setdefault(key, [])
            if value not in values[key]:
                values[key].append(value)
    return [f"{k}={','.join(vs)}" for k, vs in values.items()]


def queue_grid(root: Path, points: list[Point], logger) -> dict[str, str]:
    """`dvc exp run --queue -S KEY=V1,V2 ...`: DVC queues the grid; experiment name -> its point as we write it."""
    axes = grid_axes(points)
    try:
        out = dvc(root, logger, "exp", "run", "--queue", *(a for axis in axes for a in ("-S", axis)),
                  timeout_s=QUEUE_TIMEOUT_S)  # fmt: skip
    except dvcrun.CommandFailed as exc:
        raise SweepError(f"could not queue the grid: {exc}") from None

    def key(pairs) -> frozenset[str]:
        return frozenset(p.replace(" ", "") for p in pairs)

    by_overrides = {key(p.pairs): str(p) for p in points}
    named: dict[str, str] = {}
    pending: frozenset[str] | None = key(points[0].pairs) if len(points) == 1 else None  # no sweep: no overrides line
    for line in out:
        if m := OVERRIDES_RE.search(line):
            pending = key(_overrides(m.group(1)))
        elif (m := QUEUED_RE.search(line)) and pending is not None:
            named[m.group(1)] = by_overrides.get(pending, " ".join(sorted(pending)))
            pending = None
    if len(named) != len(points):
        raise SweepError(
            f"DVC queued {len(named)} experiment(s) for a grid of {len(points)} point(s); see `dvc queue status`:\n"
            + "\n".join(out[-10:])
        )
    return named


def _overrides(printed: str) -> list[str]:
    """DVC's `{'params.yaml': ['model.z=2', ...]}` (a Python literal it prints) -> the `KEY=VALUE` pairs."""
    try:
        return [pair for pairs in ast.literal_eval(printed).values() for pair in pairs]
    except (ValueError, SyntaxError, AttributeError):
        return []


def queue_states(root: Path, logger) -> dict[str, str]:
    """`dvc queue status`: experiment name -> Queued | Running | Success | Failed (its table, parsed)."""
    states: dict[str, str] = {}
    for line in dvc(root, quiet(), "queue", "status"):
        cols = line.split()
        if len(cols) >= 4 and cols[0] != "Task" and re.fullmatch(r"[0-9a-f]{7,}", cols[0]):
            states[cols[1]] = cols[-1]
    return states


def wait_for_queue(root: Path, names: list[str], logger, timeout_s: float = RUN_TIMEOUT_S) -> None:
    """Poll `dvc queue status` until none of `names` is queued or running."""
    deadline = time.monotonic() + timeout_s
    last: dict[str, str] = {}
    while True:
        states = {n: s for n, s in queue_states(root, logger).items() if n in names}
        if states != last:
            logger.info("queue: %s", ", ".join(f"{n} {s}" for n, s in sorted(states.items())))
            last = states
        if not any(s in ("Queued", "Running") for s in states.values()):
            return
        if time.monotonic() > deadline:
            raise ExperimentsFailed(f"the sweep's experiments were still running after {timeout_s:.0f} s: `dvc queue status`")
        time.sleep(POLL_S)


def outcomes(root: Path, names: list[str], logger) -> dict[str, str]:
    """Each experiment's end as `dvc exp show --json` reports it: "success", "failed", or "unknown"."""
    shown = json.loads("\n".join(dvc(root, quiet(), "exp", "show", "--json")))
    states: dict[str, str] = {}
    for baseline in shown if isinstance(shown, list) else []:
        for exp in baseline.get("experiments") or []:
            state = (exp.get("executor") or {}).get("state")
            for rev in exp.get("revs") or []:
                if rev.get("name"):
                    states[rev["name"]] = state or "success"  # a finished experiment without an executor record
            if exp.get("name"):
                states[exp["name"]] = state or states.get(exp["name"], "success")
    return {n: states.get(n, "unknown") for n in names}


def sweep(root: Path, axes: list[str], jobs: int, logger) -> dict[str, str]:
    """Validate, queue and run the grid; experiment name -> its grid point. Raises on any failure."""
    points = parse_grid(axes or list(DEFAULT_GRID))
    validate(root, points)
    named = queue_grid(root, points, logger)
    for name, point in named.items():
        logger.info("queued %s: %s", name, point)
    start_workers(root, jobs, logger)
    try:
        wait_for_queue(root, list(named), logger)
    finally:
        dvc(root, logger, "queue", "stop")  # its workers go once nothing runs
    ended = outcomes(root, list(named), logger)
    bad = {n: s for n, s in ended.items() if s != "success"}
    if bad:
        lines = "\n".join(f"  - {n} ({named[n]}): {s}; see `dvc queue logs {n}`" for n, s in bad.items())
        raise ExperimentsFailed(f"{len(bad)} of {len(named)} experiments of the sweep did not succeed:\n{lines}")
    return named


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when every experiment succeeded, 1 when some failed, 2 on a bad grid (nothing queued)."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("axes", nargs="*", metavar="KEY=V1,V2,...", help=f"grid axes (default: {' '.join(DEFAULT_GRID)})")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="experiments run at once (default 1)")
    cli_args.add_root_arg(parser, default=None, help="the checkout (default: the one holding this code)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logger = logging.getLogger("sweep")
    try:
        if args.jobs < 1:
            raise SweepError(f"--jobs {args.jobs}: must be at least 1")
        named = sweep((args.root or CHECKOUT).resolve(), args.axes, args.jobs, logger)
    except (ParamsError, SweepError) as exc:
        return console.fail(exc)
    except VaeMlopsError as exc:  # failed experiments, or DVC's queue runner itself failed
        return console.fail(exc, 1)
    console.print_named(named)
    return 0


if __name__ == "__main__":
    sys.exit(main())
