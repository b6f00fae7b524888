"""Every use of MLflow's internals, and nothing else: what MLflow's public API does not offer.

System metrics on a client-made run. MLflow's public way, `mlflow.start_run(log_system_metrics=True)` (or
`mlflow.enable_system_metrics_logging()`), does not fit the pipeline's runs, for two reasons read in MLflow's
`tracking/fluent.py` and `system_metrics/system_metrics_monitor.py`:

- it lives on the fluent API's active run: the monitor gets no tracking URI (it uses the process-wide one
  `mlflow.set_tracking_uri` sets) and `mlflow.end_run` ends the run. The pipeline's runs are `MlflowClient`
  runs on an explicit store (`tracking/store.py` is the one door), ended with their own status;
- a run shorter than the sampling interval gets no sample: the monitor logs a sample only after a whole
  interval, and `finish()` drops the interval in progress (a run of 3 s at a 10 s interval logs no
  `system/` metric); no public call logs that last sample.

So the monitor is driven here.

A model's concrete artifact location (`models:/` or `runs:/` resolved), which the checks before loading a
version read file by file: `mlflow.artifacts` downloads by those URIs but does not say where they point.

MLflow's scoring app on a local model folder, for the guarded ASGI app uvicorn serves: `mlflow models
serve` is the public way to run it, and it offers no place for the guard in front.

tests/test_tool_internals.py checks that everything called here still exists with the parameters used.
"""

from __future__ import annotations

import logging
from typing import Any

from mlflow.pyfunc import scoring_server
from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository
from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

log = logging.getLogger(__name__)


def start_system_metrics(run_id: str, tracking_uri: str, interval_s: float) -> SystemMetricsMonitor | None:
    """MLflow's system metrics monitor (CPU, memory, disk, network, GPU) on the run; None if it fails to start."""
    try:
        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, tracking_uri=tracking_uri)
        monitor.start()
    except Exception as exc:  # figures about the machine are worth no failed training
        log.warning("system metrics are not logged: %s: %s", type(exc).__name__, exc)
        return None
    return monitor


def stop_system_metrics(monitor: SystemMetricsMonitor | None, last_sample: bool = True) -> None:
    """Stop the monitor and log a last sample, so a run shorter than the sampling interval has one too."""
    if monitor is None:
        return
    try:
        monitor.finish()
        if not last_sample:
            return
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
    except Exception as exc:
        log.warning("the last system metrics sample was not logged: %s: %s", type(exc).__name__, exc)


def artifact_root(model_uri: str) -> str:
    """The concrete artifact URI (file://, mlflow-artifacts:/, s3://...) of a `models:/` or `runs:/` URI.

    Resolved against the process's tracking URI: call it where the store is set.
    """
    if ModelsArtifactRepository.is_models_uri(model_uri):
        return ModelsArtifactRepository.get_underlying_uri(model_uri)
    if RunsArtifactRepository.is_runs_uri(model_uri):
        return RunsArtifactRepository.get_underlying_uri(model_uri)
    return model_uri


def scoring_app(model_dir: str) -> Any:
    """MLflow's scoring server app (the one `mlflow models serve` runs) on the local pyfunc folder `model_dir`."""
    return scoring_server.init(scoring_server.load_model_with_mlflow_config(model_dir))
