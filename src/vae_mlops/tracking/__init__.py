"""The one door to MLflow: the store, the pipeline's run, the train logger, the registry.

Nothing else in the package imports `mlflow`, and these modules import it inside
their functions, so the download stage and the unit tests never pay for it.

One pipeline run is one MLflow run. The train stage creates it and writes its id
to `reports/mlflow_run.json` (a DVC output of train); evaluate and register
reopen that run, so params, per-epoch curves, test metrics, pictures and the
logged model sit side by side in the UI's compare view.

The store is `sqlite:///<root>/mlflow.db` with artifacts in `<root>/mlartifacts/`
unless `MLFLOW_TRACKING_URI` names another one (a tracking server, say).

The door is split by concern: `store` (which store, reachability, a client,
`use_store`), `runs` (the pipeline's run and the train logger), `registry_client`
(the Model Registry) and `reader` (read-only calls for the comparison report).
`from vae_mlops import tracking` gives all of them, as before the split.
"""

from __future__ import annotations

from vae_mlops.tracking.store import (  # noqa: F401
    REACH_TIMEOUT_S,
    HTTP_DEFAULTS,
    ENV_TRACKING_URI,
    ENV_REGISTRY_URI,
    ENV_DVC_EXP_NAME,
    ENV_DVC_ROOT,
    DVC_EXEC_DIR,
    TrackingError,
    tracking_uri,
    workspace_root,
    dvc_experiment,
    local_store_path,
    is_server,
    check_reachable,
    connect,
    use_store,
    mlflow_client,
    error_code,
    ensure_experiment,
)
from vae_mlops.tracking.runs import (  # noqa: F401
    TAG_GIT_COMMIT,
    TAG_GIT_DIRTY,
    TAG_DATASET,
    TAG_DATA_HASH,
    TAG_DATA_SHA256,
    TAG_DEVICE,
    TAG_TORCH,
    TAG_PRECISION,
    TAG_DVC_EXPERIMENT,
    TAG_DESCRIPTION,
    EPOCH_METRICS,
    DATASET_DIGEST_CHARS,
    INPUT_CONTEXT_TAG,
    SYSTEM_METRICS_INTERVAL_S,
    git_state,
    run_tags,
    describe,
    run_name,
    run_name_from_params,
    PipelineRun,
    dataset_input,
    is_logging_rank,
    start_run,
    resume_run,
    stage_run,
    MlflowRunLogger,
    train_run,
    start_system_metrics,
    stop_system_metrics,
)
from vae_mlops.tracking.registry_client import (  # noqa: F401
    VersionInfo,
    ModelRegistry,
)
from vae_mlops.tracking.reader import (  # noqa: F401
    RunSummary,
    RunReader,
)

# The names other modules and tests used before the split.
_client = mlflow_client
_error_code = error_code
_experiment_id = ensure_experiment
