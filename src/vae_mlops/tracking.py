"""The one door to MLflow: the store, the pipeline's run, the train logger, logged models, the registry.

Nothing else in the package imports `mlflow`, and this module imports it inside
its functions, so the download stage and the unit tests never pay for it.

One pipeline run is one MLflow run. The train stage creates it and writes its id
to `reports/mlflow_run.json` (a DVC output of train); evaluate and register
reopen that run, so params, per-epoch curves, test metrics, pictures and the
logged model sit side by side in the UI's compare view.

The store is `sqlite:///<root>/mlflow.db` with artifacts in `<root>/mlartifacts/`
unless `MLFLOW_TRACKING_URI` names another one (a tracking server, say).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator
from urllib.parse import urlparse

from torch import Tensor

from vae_mlops import atomic
from vae_mlops.params import Params
from vae_mlops.paths import Paths

if TYPE_CHECKING:
    from vae_mlops.train import EpochStats

log = logging.getLogger(__name__)

# Tags on every pipeline run (and, where they apply, on every model version).
TAG_GIT_COMMIT = "git.commit"
TAG_GIT_DIRTY = "git.dirty"
TAG_DATASET = "data.dataset"
TAG_DATA_HASH = "data.hash"
TAG_DATA_SHA256 = "data.sha256."  # + file name
TAG_DEVICE = "device"
TAG_TORCH = "torch.version"

# Per-epoch metric key -> EpochStats field; logged with step=epoch.
EPOCH_METRICS = {
    "train/loss": "train_loss",
    "train/recon": "train_recon",
    "train/kl": "train_kl",
    "val/loss": "val_loss",
    "val/recon": "val_recon",
    "val/kl": "val_kl",
}

MODEL_ARTIFACT = "vae"  # the logged model's name inside its run
REACH_TIMEOUT_S = 5.0  # the reachability check at the start of a stage
# MLflow's own defaults retry a dead server for about four minutes per call; a
# pipeline stage would rather learn fast. The user's environment still wins.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


class TrackingError(RuntimeError):
    """The tracking store cannot be reached, or lacks the run a stage needs; says what to do."""


# ---------------------------------------------------------------- the store


def tracking_uri(paths: Paths) -> str:
    """`MLFLOW_TRACKING_URI`, or the project's own sqlite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{paths.mlflow_db.resolve()}"


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
        import requests

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

    `mlflow.set_tracking_uri` also writes `MLFLOW_TRACKING_URI` into `os.environ`;
    restoring both afterwards keeps one stage's store from leaking into the next
    call or into child processes. The registry lives in the tracking store.
    """
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    saved = tracking_utils._tracking_uri, registry_utils._registry_uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri = saved
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _error_code(exc: BaseException) -> str | None:
    return getattr(exc, "error_code", None)


def _experiment_id(client, name: str, uri: str) -> str:
    """The experiment's id, created on first use (artifacts beside a sqlite store, not in the cwd)."""
    from mlflow.exceptions import MlflowException

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
        if _error_code(exc) != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


# ---------------------------------------------------------------- provenance


def git_state(root: Path) -> tuple[str, str]:
    """(commit, "true"/"false" dirty) of the repo holding `root`; "unknown" outside git.

    Only tracked files count, and not `dvc.lock`: DVC rewrites it between stages.
    """
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=30).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)dvc.lock").strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown", "unknown"
    return commit, "true" if dirty else "false"


def run_tags(params: Params, paths: Paths, device: str, manifest: dict) -> dict[str, str]:
    """Git commit and dirty flag, the data's sha256 values and hash, dataset, device, torch version."""
    import torch

    commit, dirty = git_state(paths.root)
    tags = {
        TAG_GIT_COMMIT: commit,
        TAG_GIT_DIRTY: dirty,
        "mlflow.source.git.commit": commit,  # MLflow would take it from the package's repo, not this one
        TAG_DATASET: params.data.dataset,
        TAG_DATA_HASH: manifest["data_hash"],
        TAG_DEVICE: device,
        TAG_TORCH: torch.__version__,
    }
    tags.update({TAG_DATA_SHA256 + name: sha for name, sha in manifest["files"].items()})
    return tags


def run_name(params: Params) -> str:
    """What tells runs apart at a glance in the UI: data, likelihood, sizes, epochs."""
    m = params.model
    return f"{params.data.dataset}-{m.likelihood}-h{m.hidden_dim}-z{m.latent_dim}-e{params.train.epochs}"


# ---------------------------------------------------------------- the pipeline's run


@dataclass
class PipelineRun:
    """One MLflow run that the train, evaluate and register stages all log into."""

    run_id: str
    experiment_id: str
    uri: str
    _client: Any = field(default=None, repr=False, compare=False)

    @property
    def client(self):
        if self._client is None:
            self._client = _client(self.uri)
        return self._client

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()])

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_image(self, grid: Tensor, key: str, step: int) -> None:
        """A (C, H, W) grid on [0, 1] as a stepped image: the UI's image view slides through the steps."""
        self.client.log_image(self.run_id, _hwc_uint8(grid), key=key, step=step, synchronous=True)

    def log_files(self, files: dict[str, Path], artifact_path: str) -> None:
        for path in files.values():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    def to_dict(self) -> dict[str, str]:
        return {"run_id": self.run_id, "experiment_id": self.experiment_id, "tracking_uri": self.uri}

    def log_model(self, module, input_example, tags: dict[str, str]) -> str:
        """`mlflow.pytorch.log_model` with a signature and an input example; returns `models:/<model_id>`.

        The module is pickled with the package's code beside it (`code_paths`), so
        `mlflow.pyfunc.load_model` works where `vae_mlops` is not installed.
        """
        import mlflow
        import mlflow.pytorch

        import vae_mlops

        with use_store(self.uri), mlflow.start_run(run_id=self.run_id):  # log_model logs into the active run
            info = mlflow.pytorch.log_model(
                module,
                name=MODEL_ARTIFACT,
                signature=model_signature(),
                input_example=input_example,
                serialization_format="pickle",  # the pt2 export would freeze `output` to one value
                code_paths=[str(Path(vae_mlops.__file__).parent)],
                pip_requirements=[f"torch=={metadata.version('torch')}", f"cloudpickle=={metadata.version('cloudpickle')}"],
                tags=tags,
            )
        return info.model_uri


def model_signature():
    """(N, 784) float32 in; one float32 tensor out, chosen by the inference param `output`."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    from vae_mlops.pyfunc import DEFAULT_OUTPUT

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 784))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1))]),
        params=ParamSchema([ParamSpec("output", "string", DEFAULT_OUTPUT)]),
    )


def _hwc_uint8(grid: Tensor):
    """(C, H, W) float on [0, 1] -> (H, W, C) uint8 numpy, the form `log_image` takes."""
    g = grid.detach().float().cpu().mul(255).round().clamp(0, 255).byte()
    return g.permute(1, 2, 0).numpy() if g.ndim == 3 else g.numpy()


def is_logging_rank() -> bool:
    """Under torchrun only rank 0 talks to MLflow."""
    return os.environ.get("RANK", "0") == "0"


def start_run(params: Params, paths: Paths, device: str, manifest: dict) -> PipelineRun:
    """Create the pipeline's run with every param and the provenance tags; record it in the run file."""
    from mlflow.tracking.context.registry import resolve_tags

    uri = tracking_uri(paths)
    client = _client(uri)
    experiment_id = _experiment_id(client, params.mlflow.experiment, uri)
    tags = resolve_tags({"mlflow.source.name": "vae_mlops train", **run_tags(params, paths, device, manifest)})
    info = client.create_run(experiment_id, run_name=run_name(params), tags=tags).info
    run = PipelineRun(info.run_id, experiment_id, uri, client)
    run.log_params(params.flat())
    atomic.write_json(paths.train_run_file, {**run.to_dict(), "experiment": params.mlflow.experiment})
    log.info("MLflow run %s (%s) in experiment %r at %s", info.run_id, info.run_name, params.mlflow.experiment, uri)
    return run


def resume_run(paths: Paths) -> PipelineRun:
    """The run the train stage recorded, found in the current store, or a `TrackingError` saying why not."""
    run_file = paths.train_run_file
    if not run_file.is_file():
        raise TrackingError(f"{run_file} not found: the train stage writes it; run `dvc repro train` first")
    recorded = json.loads(run_file.read_text())
    uri = connect(paths)
    client = _client(uri)
    try:
        client.get_run(recorded["run_id"])
    except Exception as exc:  # RESOURCE_DOES_NOT_EXIST, or a store that fails to answer
        raise TrackingError(
            f"MLflow run {recorded['run_id']} (recorded in {run_file}, created in {recorded.get('tracking_uri')}) "
            f"cannot be read from {uri} ({type(exc).__name__}: {str(exc)[:200]}). Point MLFLOW_TRACKING_URI "
            "at the store that holds it, or retrain into the current store with `dvc repro -f train`."
        ) from None
    return PipelineRun(recorded["run_id"], recorded["experiment_id"], uri, client)


@contextlib.contextmanager
def stage_run(paths: Paths) -> Iterator[PipelineRun]:
    """Reopen the pipeline's run for a later stage; FINISHED when the stage succeeds, FAILED when it raises.

    A store that stops answering during the stage becomes a `TrackingError` that says to rerun.
    """
    run = resume_run(paths)
    run.client.update_run(run.run_id, status="RUNNING")
    try:
        yield run
    except BaseException as exc:
        with contextlib.suppress(Exception):
            run.end("FAILED")
        if isinstance(exc, Exception):
            _raise_if_store_lost(run, exc)
        raise
    try:
        run.end("FINISHED")
    except Exception as exc:
        _raise_if_store_lost(run, exc)
        raise


def _raise_if_store_lost(run: PipelineRun, exc: Exception) -> None:
    """Raise `TrackingError` from `exc` if the store no longer answers; return if it does (`exc` is another fault)."""
    if isinstance(exc, TrackingError):
        return
    try:
        check_reachable(run.uri)
    except TrackingError:
        raise TrackingError(
            f"lost the MLflow tracking store {run.uri} during this stage ({type(exc).__name__}: {str(exc)[:300]}). "
            f"Run {run.run_id} misses this stage's results. Once the store answers again, rerun `dvc repro`: "
            "earlier stages are not rerun, and this one logs into the same run."
        ) from exc


# ---------------------------------------------------------------- the train stage's logger


class MlflowRunLogger:
    """The train stage's `RunLogger`: per-epoch metrics and image grids into the pipeline's run.

    A failed call (the server went away) never stops training: the first failure
    is kept, later calls are skipped, and `finish` raises `TrackingError` after
    the stage has written its outputs.
    """

    def __init__(self, run: PipelineRun) -> None:
        self.run = run
        self.failure: str | None = None

    def log_epoch(self, stats: EpochStats) -> None:
        values = {key: getattr(stats, name) for key, name in EPOCH_METRICS.items()}
        self._call(f"epoch {stats.epoch}", self.run.log_metrics, values, stats.epoch)

    def log_images(self, grids: dict[str, Tensor], step: int) -> None:
        for name, grid in grids.items():
            self._call(f"epoch {step} image {name!r}", self.run.log_image, grid, f"train/{name}", step)

    def _call(self, what: str, fn, *args) -> None:
        if self.failure is not None:
            return
        try:
            fn(*args)
        except Exception as exc:  # any transport or server error: training goes on, the stage fails at the end
            self.failure = f"{what}: {type(exc).__name__}: {str(exc)[:300]}"
            log.error("MLflow logging failed at %s; training continues, the stage will fail at the end", self.failure)

    def finish(self, paths: Paths) -> None:
        """Mark the run FINISHED, or raise `TrackingError` if any logging failed."""
        if self.failure is None:
            try:
                self.run.end("FINISHED")
                return
            except Exception as exc:
                self.failure = f"closing the run: {type(exc).__name__}: {str(exc)[:300]}"
        paths.train_run_file.unlink(missing_ok=True)  # it names a run that misses epochs
        raise TrackingError(
            f"lost the MLflow tracking store {self.run.uri} at {self.failure}. Training finished and its outputs "
            f"are kept ({paths.model_file}, {paths.checkpoints_dir}/). Once the store answers again, rerun "
            "`dvc repro`: the train stage resumes from the final checkpoint without retraining and logs the "
            f"whole run into a new MLflow run (run {self.run.run_id} stays incomplete); evaluate and register follow."
        )


@contextlib.contextmanager
def train_run(params: Params, paths: Paths, device: str, manifest: dict) -> Iterator[MlflowRunLogger | None]:
    """The train stage's logger for a new pipeline run (None on ranks other than 0)."""
    if not is_logging_rank():
        yield None
        return
    logger = MlflowRunLogger(start_run(params, paths, device, manifest))
    try:
        yield logger
    except BaseException:
        if logger.failure is None:
            with contextlib.suppress(Exception):
                logger.run.end("FAILED")
        raise
    logger.finish(paths)


# ---------------------------------------------------------------- the Model Registry


@dataclass(frozen=True)
class VersionInfo:
    """A registered model version, as plain data."""

    version: str
    run_id: str
    tags: dict[str, str]


class ModelRegistry:
    """The registry's calls for one registered model: versions, aliases, tags, loading."""

    def __init__(self, name: str, uri: str) -> None:
        self.name = name
        self.uri = uri
        self.client = _client(uri)

    def aliases(self) -> dict[str, str]:
        """alias -> version; empty while the model has no version."""
        from mlflow.exceptions import MlflowException

        try:
            model = self.client.get_registered_model(self.name)
        except MlflowException as exc:
            if _error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
                return {}
            raise
        return {alias: str(version) for alias, version in (model.aliases or {}).items()}

    def version(self, version: str) -> VersionInfo:
        mv = self.client.get_model_version(self.name, version)
        return VersionInfo(str(mv.version), mv.run_id, dict(mv.tags))

    def versions(self) -> list[VersionInfo]:
        found = self.client.search_model_versions(f"name = '{self.name}'")
        return sorted((VersionInfo(str(mv.version), mv.run_id, dict(mv.tags)) for mv in found), key=lambda v: int(v.version))

    def find(self, run_id: str, tag: str, value: str) -> VersionInfo | None:
        """The version registered from `run_id` whose `tag` equals `value`, if any."""
        found = self.client.search_model_versions(f"name = '{self.name}' and run_id = '{run_id}'")
        for mv in found:
            if mv.tags.get(tag) == value:
                return VersionInfo(str(mv.version), mv.run_id, dict(mv.tags))
        return None

    def create_version(self, model_uri: str, run_id: str, tags: dict[str, str]) -> VersionInfo:
        import mlflow

        with use_store(self.uri):
            mv = mlflow.register_model(model_uri, self.name, tags=tags)
        return VersionInfo(str(mv.version), mv.run_id or run_id, dict(tags))

    def set_alias(self, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(self.name, alias, version)

    def set_tags(self, version: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(self.name, version, key, value)

    def load_vae(self, version: str):
        """The VAE inside a registered version (for re-scoring a champion on new test data)."""
        import mlflow
        import mlflow.pytorch

        with use_store(self.uri):
            module = mlflow.pytorch.load_model(f"models:/{self.name}/{version}", map_location="cpu")
        return getattr(module, "vae", module)
