"""`make sweep`: a grid of DVC experiments, queued with `dvc exp run --queue` and run to completion.

    python -m pipeline.sweep [KEY=V1,V2,... ...] [--jobs N] [--root PATH]

Each `KEY=V1,V2,...` is one axis of the grid (values read as YAML, as `-S` reads
them); the grid is every combination. With no axes, the default grid:
model.latent_dim in {2, 10, 20} x model.likelihood in {bernoulli, gaussian}.
Every point is validated before anything is queued. The queue then runs in the
foreground (`dvc exp run --run-all`, DVC's temporary copies), and the command
exits non-zero when any experiment of the sweep failed.

Each experiment's MLflow run lands in the workspace's store, named and tagged
(`dvc.experiment`) after the experiment (see `vae_mlops.tracking.workspace_root`),
so `dvc exp show` and the MLflow UI list the same runs; `make history` shows every
registration decision.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import dvcrun
from vae_mlops import cli_args
from vae_mlops.errors import VaeMlopsError
from vae_mlops.params import ParamsError, apply_overrides, parse_params, parse_set_args, read_raw

CHECKOUT = Path(__file__).resolve().parents[1]  # the checkout holding this code
DEFAULT_GRID = ("model.latent_dim=2,10,20", "model.likelihood=bernoulli,gaussian")
QUEUED_RE = re.compile(r"Queued experiment '([^']+)' for future execution")
QUEUE_TIMEOUT_S = 60.0  # queueing one point (a git stash round trip)
RUN_TIMEOUT_S = 7 * 24 * 3600.0  # the queue itself: bounded by the experiments, not by us


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
            parse_params(apply_overrides(read_raw(params_file), point.overrides), str(point))
        except ParamsError as exc:
            problems += [f"{point}: {p}" for p in exc.problems]
    if problems:
        raise ParamsError(problems, f"the sweep grid (against {params_file})")


def queue(root: Path, point: Point, logger) -> str:
    """`dvc exp run --queue -S ...` for one point; returns the experiment's name."""
    cmd = [dvcrun.dvc_bin(), "exp", "run", "--queue", *(a for p in point.pairs for a in ("-S", p))]
    try:
        out = dvcrun.run_logged(cmd, root, logger, QUEUE_TIMEOUT_S)
    except dvcrun.CommandFailed as exc:
        raise SweepError(f"could not queue {point}: {exc}") from None
    for line in out:
        if m := QUEUED_RE.search(line):
            return m.group(1)
    raise SweepError(f"`{' '.join(cmd)}` did not say which experiment it queued:\n" + "\n".join(out[-10:]))


def run_queue(root: Path, jobs: int, logger) -> None:
    """Run DVC's queue in the foreground (`dvc exp run --run-all`), following every experiment's log."""
    dvcrun.run_logged([dvcrun.dvc_bin(), "exp", "run", "--run-all", "--jobs", str(jobs)], root, logger, RUN_TIMEOUT_S)


def outcomes(root: Path, names: list[str]) -> dict[str, str]:
    """Each experiment's end in DVC's queue: "success", "failed", or "unknown" (not in the queue's records)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        q = repo.experiments.celery_queue
        success = {r.entry.name for r in q.iter_success()}
        failed = {r.entry.name for r in q.iter_failed()}
    return {n: "success" if n in success else "failed" if n in failed else "unknown" for n in names}


def sweep(root: Path, axes: list[str], jobs: int, logger) -> dict[str, str]:
    """Validate, queue and run the grid; experiment name -> its grid point. Raises `SweepError` on any failure."""
    points = parse_grid(axes or list(DEFAULT_GRID))
    validate(root, points)
    named = {}
    for point in points:
        name = queue(root, point, logger)
        logger.info("queued %s: %s", name, point)
        named[name] = str(point)
    run_queue(root, jobs, logger)
    ended = outcomes(root, list(named))
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
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except VaeMlopsError as exc:  # failed experiments, or DVC's queue runner itself failed
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name, point in named.items():
        print(f"{name}: {point}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
