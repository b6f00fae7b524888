"""`python -m vae_mlops <stage>`: what `dvc.yaml` runs. A thin adapter over `stages`.

Known faults (bad params, bad data, no GPU, divergence, a bad checkpoint) end
with one clear message on stderr and exit code 2, never a traceback. Each command
imports only what it runs: a stage process then pays for its own libraries alone
(the download stage needs neither MLflow nor scikit-learn, training not the report).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Callable

from vae_mlops.cli_args import common_parser
from vae_mlops.errors import VaeMlopsError
from vae_mlops.params import load_params, parse_set_args
from vae_mlops.paths import Paths

log = logging.getLogger("vae_mlops")


def _cmd_download(args: argparse.Namespace) -> dict:
    from vae_mlops.stages.download import download

    params = load_params(args.params, parse_set_args(args.set))
    return download(params.data, Paths(args.root))


def _cmd_train(args: argparse.Namespace) -> dict:
    from vae_mlops import distributed, snapshots, tracking
    from vae_mlops.stages.train import train
    from vae_mlops.train import resolve_device

    params = load_params(args.params, parse_set_args(args.set))
    if params.train.nproc > 1 and not distributed.launched_by_torchrun():
        argv = ["train", "--params", str(args.params), "--root", str(args.root)]
        distributed.exec_torchrun(params.train.nproc, [*argv, *(a for s in args.set for a in ("-S", s))])
    paths = Paths(args.root)
    if tracking.is_logging_rank():
        tracking.connect(paths)  # an unreachable server fails here, before any data is read
    device = resolve_device(params.train.device)
    manifest = snapshots.training_manifest(params.data, paths)  # the dataset and the named snapshots
    with tracking.train_run(params, paths, str(device), manifest) as logger:
        return train(params, paths, logger)


def _cmd_evaluate(args: argparse.Namespace) -> dict:
    from vae_mlops import tracking
    from vae_mlops.stages.evaluate import evaluate

    params = load_params(args.params, parse_set_args(args.set))
    paths = Paths(args.root)
    with tracking.stage_run(paths) as run:
        return evaluate(params, paths, run)


def _cmd_register(args: argparse.Namespace) -> dict:
    from vae_mlops import tracking
    from vae_mlops.stages.register import register

    params = load_params(args.params, parse_set_args(args.set))
    paths = Paths(args.root)
    with tracking.stage_run(paths) as run:
        result = register(params, paths, run)
    print(f"{result['model_name']} v{result['version']} -> {result['alias']}: {result['reason']}", file=sys.stderr)
    return result


def _cmd_collect(args: argparse.Namespace) -> dict:
    """`collect`: recorded images since the last snapshot -> `data/incoming/<id>/`, then `dvc add` it."""
    from vae_mlops.collect import collect

    params = load_params(args.params, parse_set_args(args.set))
    paths = Paths(args.root)
    manifest = collect(params.data, paths, args.db, args.after_id)
    folder = paths.incoming_dir / manifest["id"]
    if args.dvc and (paths.root / ".dvc").is_dir():  # tracked like data/raw: cached, pushed, checked out by DVC
        dvc = Path(sys.executable).with_name("dvc")  # this environment's DVC, as `dvc repro` runs it
        proc = subprocess.run([str(dvc) if dvc.exists() else "dvc", "add", str(folder.relative_to(paths.root))],
                              cwd=paths.root, capture_output=True, text=True)  # fmt: skip
        if proc.returncode != 0:
            raise SnapshotAddFailed(f"`dvc add {folder}` failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    print(f"snapshot {manifest['id']}: {manifest['count']} images in {folder}; train on it: add it to "
          "data.snapshots in params.yaml, then `dvc repro` (docs/loop.md)", file=sys.stderr)  # fmt: skip
    return manifest


class SnapshotAddFailed(VaeMlopsError):
    """`dvc add` of a new snapshot failed; the snapshot folder is written and can be added by hand."""


def _cmd_registry(args: argparse.Namespace) -> dict | None:
    """`registry history`: the promotion log as a table; `registry rollback`: see `_rollback`."""
    from rich.console import Console

    from vae_mlops import registry, tracking

    paths = Paths(args.root)
    if args.action == "rollback":
        return _rollback(args, paths)
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


def _rollback(args: argparse.Namespace, paths: Paths) -> dict:
    """`registry rollback N --reason ...`: champion back to version N, recorded like a gate decision."""
    from vae_mlops import registry, tracking

    if not args.version:
        raise registry.RegistryError(f"which version? {registry.ROLLBACK_COMMAND}")
    params = load_params(args.params, parse_set_args(args.set))
    reg = tracking.ModelRegistry(params.register.model_name, tracking.connect(paths))
    decision = registry.rollback(reg, args.version, args.reason or "", params.register.metric, paths.promotion_log)
    print(f"{decision.model_name} v{decision.version} -> {decision.alias}: {decision.reason}", file=sys.stderr)
    return decision.to_dict()


def _cmd_compare(args: argparse.Namespace) -> dict:
    """`compare A B`: the comparison report of two runs (A the baseline, B the candidate); docs in compare.py."""
    from vae_mlops import compare, tracking

    params = load_params(args.params, parse_set_args(args.set))
    paths = Paths(args.root)
    out_dir = args.out if args.out is not None else paths.reports_dir
    uri = tracking.connect(paths)
    files = compare.compare_runs(args.a, args.b, uri, paths, params.evaluate, params.data.dataset, out_dir)
    return {name: str(path) for name, path in files.items()}


def _cmd_serve_model(args: argparse.Namespace) -> None:
    """`serve-model`: MLflow's scoring server on the verified champion (vae_mlops.serving); never returns."""
    from vae_mlops import serving
    from vae_mlops.tracking.store import connect

    params = load_params(args.params, parse_set_args(args.set))
    name = args.model or params.register.model_name
    serving.serve(name, args.alias, connect(Paths(args.root)), Paths(args.root), args.host, args.port,
                  args.poll_s)  # fmt: skip


COMMANDS: dict[str, Callable[[argparse.Namespace], dict | None]] = {
    "download": _cmd_download,
    "train": _cmd_train,
    "evaluate": _cmd_evaluate,
    "register": _cmd_register,
    "registry": _cmd_registry,
    "compare": _cmd_compare,
    "serve-model": _cmd_serve_model,
    "collect": _cmd_collect,
}


def build_parser() -> argparse.ArgumentParser:
    common = common_parser()
    parser = argparse.ArgumentParser(prog="python -m vae_mlops", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("download", "train", "evaluate", "register"):
        sub.add_parser(name, parents=[common], help=f"run the {name} stage")
    reg = sub.add_parser("registry", parents=[common], help="the Model Registry: `registry history`, `registry rollback N --reason ...`")
    reg.add_argument(
        "action", choices=["history", "rollback"],
        help="history: who was champion when, and why; rollback N --reason ...: champion back to version N",
    )  # fmt: skip
    reg.add_argument("version", nargs="?", help="rollback: the version to make champion again")
    reg.add_argument("--reason", help="rollback: why, for the promotion history")
    reg.add_argument("--registry", action="store_true", help="read every version's tag, not reports/promotions.jsonl")
    col = sub.add_parser("collect", parents=[common], help="recorded images -> a snapshot under data/incoming/")
    col.add_argument("--db", help="the inference table's SQLAlchemy URL (default $VAE_MONITOR_DB_URI or the local one)")
    col.add_argument("--after-id", type=int, help="take rows after this id (default: after the last snapshot's)")
    col.add_argument("--no-dvc", dest="dvc", action="store_false", help="write the snapshot but do not `dvc add` it")
    cmp = sub.add_parser("compare", parents=[common], help="a report comparing two runs: compare A B")
    cmp.add_argument("a", help="the baseline: an MLflow run id, a DVC experiment, or models:/NAME/VERSION or @ALIAS")
    cmp.add_argument("b", help="the candidate, named the same ways; deltas are B - A")
    cmp.add_argument("--out", type=Path, help="folder for compare.html and compare.md (default reports/)")
    srv = sub.add_parser("serve-model", parents=[common], help="MLflow's scoring server on the verified champion")
    srv.add_argument("--model", help="registered model (default: register.model_name)")
    srv.add_argument("--alias", default="champion", help="the alias to serve and follow (default champion)")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    srv.add_argument("--port", type=int, default=5080, help="port (default 5080)")
    srv.add_argument("--poll-s", type=float, default=10.0, help="seconds between looks at the alias (default 10)")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    try:
        result = COMMANDS[args.command](args)
    except VaeMlopsError as exc:  # a known fault: its message says what to do; anything else keeps its traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if result is not None:
        print(json.dumps(result, indent=2, default=str))
    return 0
