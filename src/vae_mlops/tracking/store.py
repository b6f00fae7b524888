"""The tracking store: which one (the workspace's sqlite, or `MLFLOW_TRACKING_URI`), is it there, a client on it.

Inside DVC's temporary copy of the workspace (`dvc exp run --queue`, `--temp`) the
store is still the workspace's: see `workspace_root`. MLflow's global state is only
touched through its public setters and getters (`use_store`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import mlflow
import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from vae_mlops.errors import VaeMlopsError
from vae_mlops.paths import Paths

REACH_TIMEOUT_S = 5.0  # the reachability check at the start of a stage
# MLflow's own defaults retry a dead server for about four minutes per call; a
# pipeline stage would rather learn fast. The user's environment still wins.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"
ENV_REGISTRY_URI = "MLFLOW_REGISTRY_URI"
# Set by DVC (3.x, dvc/repo/experiments/queue/base.py) in every `dvc exp run` stage's environment.
ENV_DVC_EXP_NAME = "DVC_EXP_NAME"
ENV_DVC_ROOT = "DVC_ROOT"
DVC_EXEC_DIR = Path(".dvc", "tmp", "exps")  # where DVC's temp-dir executors copy the workspace


class TrackingError(VaeMlopsError):
    """The tracking store cannot be reached, or lacks the run a stage needs; says what to do."""


def tracking_uri(paths: Paths) -> str:
    """`MLFLOW_TRACKING_URI`, or the workspace's own sqlite store (also from inside DVC's temporary copy)."""
    store = Paths(workspace_root(paths.root)).mlflow_db
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{store}"


def workspace_root(root: Path) -> Path:
    """The checkout the user works in, even when a stage runs in DVC's temporary copy of it.

    `dvc exp run --queue` / `--temp` run the stages in `<workspace>/.dvc/tmp/exps/<tmpXXXX>/`,
    which DVC deletes afterwards; a store there would vanish with it. DVC sets `DVC_ROOT`
    to the workspace for such runs (to the repo itself otherwise); the folder layout
    is the fallback for a stage started there by hand.
    """
    here = root.resolve()
    dvc_root = os.environ.get(ENV_DVC_ROOT)
    if dvc_root:
        parent = Path(dvc_root).resolve()
        if parent != here and here.is_relative_to(parent / DVC_EXEC_DIR):
            return parent
    for parent in here.parents:
        if parent.parts[-len(DVC_EXEC_DIR.parts) :] == DVC_EXEC_DIR.parts:
            return parent.parents[len(DVC_EXEC_DIR.parts) - 1]
    return here


def dvc_experiment() -> str | None:
    """The DVC experiment this stage runs in (`dvc exp run`, queued or not), or None under `dvc repro`."""
    return os.environ.get(ENV_DVC_EXP_NAME) or None


def local_store_path(uri: str) -> Path | None:
    """The sqlite file or folder of a store on this machine; None for a server."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :].split("?", 1)[0]).resolve()
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(parsed.path).resolve()
    if parsed.scheme == "" and uri:
        return Path(uri).resolve()
    return None


def is_server(uri: str) -> bool:
    return urlparse(uri).scheme in ("http", "https")


def check_reachable(uri: str, timeout_s: float = REACH_TIMEOUT_S) -> None:
    """Raise `TrackingError` within about `timeout_s` when the store cannot be used."""
    if is_server(uri):
        try:
            resp = requests.get(uri.rstrip("/") + "/health", timeout=timeout_s)
        except requests.RequestException as exc:
            raise TrackingError(
                f"the MLflow tracking server at {uri} is unreachable ({type(exc).__name__}: {exc}). "
                "Nothing was started. Start the server (e.g. `mlflow server --host 127.0.0.1 --port 5000`), "
                "or unset MLFLOW_TRACKING_URI to use the project's sqlite store, then rerun."
            ) from None
        if resp.status_code >= 500:
            raise TrackingError(
                f"the MLflow tracking server at {uri} answers HTTP {resp.status_code} on /health. "
                "Nothing was started. Check the server's log, or unset MLFLOW_TRACKING_URI, then rerun."
            )
        return
    store = local_store_path(uri)
    if store is not None and not store.parent.is_dir():
        raise TrackingError(f"the MLflow store {uri} is in a folder that does not exist ({store.parent})")


def connect(paths: Paths) -> str:
    """The store's URI, once MLflow's HTTP retries are bounded and the store answers."""
    uri = tracking_uri(paths)
    for var, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(var, value)
    check_reachable(uri)
    return uri


@contextlib.contextmanager
def use_store(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (active runs, `models:/` URIs) at `uri` for the block only.

    Only MLflow's public setters and getters: what was set before (explicitly, or
    through the environment) is put back afterwards, and so is `os.environ`
    (`mlflow.set_tracking_uri` writes `MLFLOW_TRACKING_URI` there), so one stage's
    store never leaks into the next call or into child processes.
    """
    env = {k: os.environ.get(k) for k in (ENV_TRACKING_URI, ENV_REGISTRY_URI)}
    # None: MLflow found no explicit choice (or only the environment's, which is restored below)
    tracking_before = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    if tracking_before == env[ENV_TRACKING_URI]:
        tracking_before = None
    registry_before = mlflow.get_registry_uri()
    if registry_before in (env[ENV_REGISTRY_URI], mlflow.get_tracking_uri()):
        registry_before = None  # the registry followed the environment or the tracking store
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(tracking_before)
        mlflow.set_registry_uri(registry_before)
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def mlflow_client(uri: str):
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def error_code(exc: BaseException) -> str | None:
    return getattr(exc, "error_code", None)


def ensure_experiment(client, name: str, uri: str) -> str:
    """The experiment's id, created on first use (artifacts beside a sqlite store, not in the cwd)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    store = local_store_path(uri)
    location = (store.parent / "mlartifacts").as_uri() if uri.startswith("sqlite:") and store else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as exc:  # another process created it first
        if error_code(exc) != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id
