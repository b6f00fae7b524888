"""The pipeline's run: provenance tags, the run itself (params, metrics, images, datasets), the train logger.

One pipeline run is one MLflow run. The train stage creates it and writes its id
to `reports/mlflow_run.json` (a DVC output of train); evaluate and register
reopen that run, so params, per-epoch curves, test metrics, pictures and the
logged model sit side by side in the UI's compare view.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import mlflow.data
import torch
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.environment_variables import MLFLOW_RUN_CONTEXT
from torch import Tensor

from vae_mlops import atomic
from vae_mlops.images import to_hwc_uint8
from vae_mlops.params import Params
from vae_mlops.paths import Paths
from vae_mlops.precision import resolve_precision
from vae_mlops.provenance import git_state
from vae_mlops.tracking.mlflow_internals import start_system_metrics, stop_system_metrics
from vae_mlops.tracking.store import (
    TrackingError,
    check_reachable,
    connect,
    dvc_experiment,
    ensure_experiment,
    mlflow_client,
    tracking_uri,
)

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
TAG_PRECISION = "train.precision"  # what `train.precision` (maybe `auto`) resolved to here: float32 | bf16
TAG_DVC_EXPERIMENT = "dvc.experiment"  # the DVC experiment's name, under `dvc exp run`
TAG_DESCRIPTION = "mlflow.note.content"  # the run page's description

# Per-epoch metric key -> EpochStats field; logged with step=epoch.
EPOCH_METRICS = {
    "train/loss": "train_loss",
    "train/recon": "train_recon",
    "train/kl": "train_kl",
    "val/loss": "val_loss",
    "val/recon": "val_recon",
    "val/kl": "val_kl",
}

DATASET_DIGEST_CHARS = 36  # MLflow's limit on a dataset digest
INPUT_CONTEXT_TAG = "mlflow.data.context"  # what the UI shows as a dataset input's context
# MLflow's default; MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it.
SYSTEM_METRICS_INTERVAL_S = 10.0


# ---------------------------------------------------------------- provenance


def run_tags(params: Params, paths: Paths, device: str, manifest: dict) -> dict[str, str]:
    """Git commit and dirty flag, the data's sha256 values and hash, dataset, device, torch version."""
    commit, dirty = git_state(paths.root)
    tags = {
        TAG_GIT_COMMIT: commit,
        TAG_GIT_DIRTY: dirty,
        "mlflow.source.git.commit": commit,  # MLflow would take it from the package's repo, not this one
        TAG_DATASET: params.data.dataset,
        TAG_DATA_HASH: manifest["data_hash"],
        TAG_DEVICE: device,
        TAG_TORCH: torch.__version__,
        TAG_PRECISION: resolve_precision(params.train.precision, torch.device(device)),
    }
    tags.update({TAG_DATA_SHA256 + name: sha for name, sha in manifest["files"].items()})
    experiment = dvc_experiment()
    if experiment:
        tags[TAG_DVC_EXPERIMENT] = experiment
    tags[TAG_DESCRIPTION] = describe(params, experiment, commit, dirty)
    return tags


def describe(params: Params, experiment: str | None, commit: str, dirty: str) -> str:
    """The run page's description (markdown): where the run came from, so the UI answers "which experiment?"."""
    origin = f"DVC experiment `{experiment}`" if experiment else "`dvc repro` (not a DVC experiment)"
    edits = " with uncommitted changes" if dirty == "true" else ""
    return (
        f"VAE on `{params.data.dataset}`, {run_name_from_params(params)}, trained by {origin} "
        f"at git commit `{commit}`{edits}."
    )


def run_name(params: Params) -> str:
    """The DVC experiment's name when there is one (so `dvc exp show` and the UI agree), else the settings."""
    return dvc_experiment() or run_name_from_params(params)


def run_name_from_params(params: Params) -> str:
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
            self._client = mlflow_client(self.uri)
        return self._client

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_params(self, params: dict[str, Any]) -> None:
        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()])

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_image(self, grid: Tensor, key: str, step: int) -> None:
        """A (C, H, W) grid on [0, 1] as a stepped image: the UI's image view slides through the steps."""
        self.client.log_image(self.run_id, to_hwc_uint8(grid), key=key, step=step, synchronous=True)

    def log_datasets(self, splits: dict[str, tuple[Any, Any]], dataset: str, data_hash: str) -> None:
        """Each split (context: train, validation, test) as a dataset input of the run: the run page's "Datasets".

        `splits` maps the split to (features, targets or None), numpy arrays or tensors.
        """
        inputs = [dataset_input(dataset, split, x, y, data_hash) for split, (x, y) in splits.items()]
        self.client.log_inputs(self.run_id, datasets=inputs)

    def log_files(self, files: dict[str, Path], artifact_path: str) -> None:
        for path in files.values():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    def to_dict(self) -> dict[str, str]:
        return {"run_id": self.run_id, "experiment_id": self.experiment_id, "tracking_uri": self.uri}


def dataset_input(dataset: str, split: str, features: Any, targets: Any, data_hash: str):
    """An MLflow dataset input: name `<dataset>-<split>`, digest = the data hash, context = the split.

    One name per split: MLflow keeps one profile (row count, shapes) per name and digest.
    The digest column holds 36 characters; the run's `data.hash` tag holds all 64.
    """
    def as_numpy(a: Any):
        return a.detach().cpu().numpy() if isinstance(a, Tensor) else a

    with warnings.catch_warnings():  # a relative path is a "local" source in more than one way; MLflow warns
        warnings.simplefilter("ignore", UserWarning)
        ds = mlflow.data.from_numpy(
            as_numpy(features), source=f"data/raw/{dataset}", targets=None if targets is None else as_numpy(targets),
            name=f"{dataset}-{split}", digest=data_hash[:DATASET_DIGEST_CHARS],
        )  # fmt: skip
    d = ds.to_dict()
    entity = Dataset(d["name"], d["digest"], d["source_type"], d["source"], d.get("schema"), d.get("profile"))
    return DatasetInput(entity, tags=[InputTag(INPUT_CONTEXT_TAG, split)])


def source_tags(name: str) -> dict[str, str]:
    """MLflow's documented system tags for who ran what (the UI's "User" and "Source" columns), and the tags a
    caller passes in `MLFLOW_RUN_CONTEXT` (a JSON object; the Prefect flow names its run there).

    `mlflow.start_run` adds them itself; a run made with `MlflowClient.create_run` gets them here.
    """
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a bare container)
        user = "unknown"
    context = json.loads(MLFLOW_RUN_CONTEXT.get() or "{}")
    return {"mlflow.user": user, "mlflow.source.type": "LOCAL", "mlflow.source.name": name, **context}


def is_logging_rank() -> bool:
    """Under torchrun only rank 0 talks to MLflow."""
    return os.environ.get("RANK", "0") == "0"


def start_run(params: Params, paths: Paths, device: str, manifest: dict) -> PipelineRun:
    """Create the pipeline's run with every param and the provenance tags; record it in the run file."""
    uri = tracking_uri(paths)
    client = mlflow_client(uri)
    experiment_id = ensure_experiment(client, params.mlflow.experiment, uri)
    tags = {**source_tags("vae_mlops train"), **run_tags(params, paths, device, manifest)}
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
    client = mlflow_client(uri)
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
    try:
        run.client.update_run(run.run_id, status="RUNNING")
    except Exception as exc:  # the store died between the check and this first call
        _raise_if_store_lost(run, exc)
        raise
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

    def log_datasets(self, splits: dict[str, tuple[Any, Any]], dataset: str, data_hash: str) -> None:
        self._call(f"dataset inputs {', '.join(splits)}", self.run.log_datasets, splits, dataset, data_hash)

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
    monitor = start_system_metrics(logger.run.run_id, logger.run.uri, SYSTEM_METRICS_INTERVAL_S)
    try:
        yield logger
    except BaseException:
        stop_system_metrics(monitor, last_sample=logger.failure is None)
        if logger.failure is None:
            with contextlib.suppress(Exception):
                logger.run.end("FAILED")
        raise
    stop_system_metrics(monitor, last_sample=logger.failure is None)  # a lost store gets no more calls
    logger.finish(paths)
