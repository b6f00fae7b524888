"""`python -m vae_mlops <stage>`: what `dvc.yaml` runs. A thin adapter over `stages`.

Known faults (bad params, bad data, no GPU, divergence, a bad checkpoint) end
with one clear message on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Callable

import yaml

from vae_mlops import stages
from vae_mlops.checkpoint import CheckpointError
from vae_mlops.data import DataError
from vae_mlops.params import ParamsError, load_params
from vae_mlops.paths import Paths
from vae_mlops.train import DeviceError, TrainingDiverged

EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    ParamsError,
    DataError,
    DeviceError,
    TrainingDiverged,
    CheckpointError,
)

log = logging.getLogger("vae_mlops")


def _overrides(pairs: list[str]) -> dict:
    """`-S train.epochs=3` -> {"train.epochs": 3}, values parsed as YAML (like `dvc exp run -S`)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ParamsError([f"-S {pair}: expected key=value"], "the command line")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _cmd_download(args: argparse.Namespace) -> dict:
    params = load_params(args.params, _overrides(args.set))
    return stages.download(params.data, Paths(args.root))


def _cmd_train(args: argparse.Namespace) -> dict:
    params = load_params(args.params, _overrides(args.set))
    return stages.train(params, Paths(args.root), _train_logger(params, Paths(args.root)))


def _train_logger(params, paths):  # replaced by the MLflow logger once tracking is wired
    return None


COMMANDS: dict[str, Callable[[argparse.Namespace], dict]] = {
    "download": _cmd_download,
    "train": _cmd_train,
}


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default params.yaml)")
    common.add_argument("--root", type=Path, default=Path("."), help="project root (default .)")
    common.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE", help="override a param")
    parser = argparse.ArgumentParser(prog="python -m vae_mlops", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        sub.add_parser(name, parents=[common], help=f"run the {name} stage")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    try:
        result = COMMANDS[args.command](args)
    except EXPECTED_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if result is not None:
        print(json.dumps(result, indent=2, default=str))
    return 0
