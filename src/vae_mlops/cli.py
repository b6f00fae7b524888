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


from vae_mlops import data, registry, stages, tracking
from vae_mlops.atomic import WriteError
from vae_mlops.checkpoint import CheckpointError
from vae_mlops.data import DataError
from vae_mlops.metrics import MetricsError
from vae_mlops.params import ParamsError, load_params, parse_set_args
from vae_mlops.paths import Paths
from vae_mlops.registry import RegistryError
from vae_mlops.tracking import TrackingError
from vae_mlops.train import DeviceError, TrainingDiverged, resolve_device

EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    ParamsError,
    DataError,
    DeviceError,
    TrainingDiverged,
    CheckpointError,
    TrackingError,
    MetricsError,
    RegistryError,
    WriteError,
)

log = logging.getLogger("vae_mlops")


def _cmd_download(args: argparse.Namespace) -> dict:
    params = load_params(args.params, parse_set_args(args.set))
    return stages.download(params.data, Paths(args.root))


def _cmd_train(args: argparse.Namespace) -> dict:
    params = load_params(args.params, parse_set_args(args.set))
    paths = Paths(args.root)
    if tracking.is_logging_rank():
        tracking.connect(paths)  # an unreachable server fails here, before any data is read
    device = resolve_device(params.train.device)
    manifest = data.read_manifest(paths.raw_dir(params.data.dataset))
    with tracking.train_run(params, paths, str(device), manifest) as logger:
        return stages.train(params, paths, logger)


def _cmd_evaluate(args: argparse.Namespace) -> dict:
    params = load_params(args.params, parse_set_args(args.set))
    paths = Paths(args.root)
    with tracking.stage_run(paths) as run:
        return stages.evaluate(params, paths, run)


def _cmd_register(args: argparse.Namespace) -> dict:
    params = load_params(args.params, parse_set_args(args.set))
    paths = Paths(args.root)
    with tracking.stage_run(paths) as run:
        result = stages.register(params, paths, run)
    print(f"{result['model_name']} v{result['version']} -> {result['alias']}: {result['reason']}", file=sys.stderr)
    return result


def _cmd_registry(args: argparse.Namespace) -> None:
    """`registry history`: the promotion log as a table (this repo's log, or every version's tag)."""
    from rich.console import Console

    paths = Paths(args.root)
    if args.registry:
        params = load_params(args.params, parse_set_args(args.set))
        reg = tracking.ModelRegistry(params.register.model_name, tracking.connect(paths))
        rows, title = registry.registry_history(reg), f"promotions of {reg.name} (registry tags)"
    else:
        rows, title = registry.read_log(paths.promotion_log), f"promotions ({paths.promotion_log})"
    if not rows:
        print(f"no promotions recorded yet ({'registry' if args.registry else paths.promotion_log})")
        return None
    Console(width=max(160, Console().width)).print(registry.history_table(rows, title))
    return None


COMMANDS: dict[str, Callable[[argparse.Namespace], dict | None]] = {
    "download": _cmd_download,
    "train": _cmd_train,
    "evaluate": _cmd_evaluate,
    "register": _cmd_register,
    "registry": _cmd_registry,
}


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default params.yaml)")
    common.add_argument("--root", type=Path, default=Path("."), help="project root (default .)")
    common.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE", help="override a param")
    parser = argparse.ArgumentParser(prog="python -m vae_mlops", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("download", "train", "evaluate", "register"):
        sub.add_parser(name, parents=[common], help=f"run the {name} stage")
    reg = sub.add_parser("registry", parents=[common], help="the Model Registry: `registry history`")
    reg.add_argument("action", choices=["history"], help="history: who was champion when, and why")
    reg.add_argument("--registry", action="store_true", help="read every version's tag, not reports/promotions.jsonl")
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
