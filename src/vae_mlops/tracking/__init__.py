"""The one door to MLflow: the store, the pipeline's run, the train logger, the registry.

The core (params, data, model, training) never imports `mlflow`; this package and the model
format (`model_store`, `pyfunc`) do, and `tests/test_architecture.py` holds them to it.

One pipeline run is one MLflow run. The train stage creates it and writes its id
to `reports/mlflow_run.json` (a DVC output of train); evaluate and register
reopen that run, so params, per-epoch curves, test metrics, pictures and the
logged model sit side by side in the UI's compare view.

The store is `sqlite:///<root>/mlflow.db` with artifacts in `<root>/mlartifacts/`
unless `MLFLOW_TRACKING_URI` names another one (a tracking server, say).

The door is split by concern: `store` (which store, reachability, a client,
`use_store`), `runs` (the pipeline's run and the train logger), `registry_client`
(the Model Registry) and `reader` (read-only calls for the comparison report).
`from vae_mlops import tracking` gives the names other modules use; anything else
is imported from its own module.
"""

from __future__ import annotations

from vae_mlops.tracking.reader import RunReader, RunSummary
from vae_mlops.tracking.registry_client import ModelRegistry, VersionInfo
from vae_mlops.tracking.runs import (
    EPOCH_METRICS,
    TAG_DATA_HASH,
    TAG_DATASET,
    TAG_DESCRIPTION,
    TAG_DVC_EXPERIMENT,
    TAG_GIT_COMMIT,
    TAG_PRECISION,
    MlflowRunLogger,
    PipelineRun,
    git_state,
    is_logging_rank,
    resume_run,
    run_name,
    run_name_from_params,
    run_tags,
    stage_run,
    train_run,
)
from vae_mlops.tracking.store import (
    REACH_TIMEOUT_S,
    TrackingError,
    check_reachable,
    connect,
    ensure_experiment,
    local_store_path,
    mlflow_client,
    tracking_uri,
    use_store,
    workspace_root,
)

__all__ = [
    "EPOCH_METRICS",
    "REACH_TIMEOUT_S",
    "TAG_DATASET",
    "TAG_DATA_HASH",
    "TAG_DESCRIPTION",
    "TAG_DVC_EXPERIMENT",
    "TAG_GIT_COMMIT",
    "TAG_PRECISION",
    "MlflowRunLogger",
    "ModelRegistry",
    "PipelineRun",
    "RunReader",
    "RunSummary",
    "TrackingError",
    "VersionInfo",
    "check_reachable",
    "connect",
    "ensure_experiment",
    "git_state",
    "is_logging_rank",
    "local_store_path",
    "mlflow_client",
    "resume_run",
    "run_name",
    "run_name_from_params",
    "run_tags",
    "stage_run",
    "tracking_uri",
    "train_run",
    "use_store",
    "workspace_root",
]
