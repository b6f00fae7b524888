"""The command-line options every entry point shares: `--params`, `--root` and `-S KEY=VALUE`.

`python -m vae_mlops`, the Prefect runners (`python -m pipeline.flows`, `.serve`, `.deploy`)
and `make bench` declare them here, so each is spelt, defaulted and parsed one way.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from vae_mlops.params import parse_set_args

DEFAULT_PARAMS = Path("params.yaml")
DEFAULT_ROOT = Path(".")


def add_params_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="params file (default params.yaml)")


def add_root_arg(
    parser: argparse.ArgumentParser, default: Path | None = DEFAULT_ROOT, help: str = "project root (default .)"
) -> None:
    """`--root`; the Prefect runners default to None: the checkout holding their code."""
    parser.add_argument("--root", type=Path, default=default, help=help)


def add_set_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-S", "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a param, e.g. -S train.epochs=3 (repeatable; the value is read as YAML, as `dvc exp run -S`)",
    )  # fmt: skip


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`--params`, `--root` and `-S` on `parser`; returns it."""
    add_params_arg(parser)
    add_root_arg(parser)
    add_set_arg(parser)
    return parser


def common_parser() -> argparse.ArgumentParser:
    """The common options as a parent parser, for subcommands: `sub.add_parser(name, parents=[common_parser()])`."""
    return add_common_args(argparse.ArgumentParser(add_help=False))


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The `-S` pairs as dotted keys; a malformed pair is a `ParamsError`."""
    return parse_set_args(args.set)
