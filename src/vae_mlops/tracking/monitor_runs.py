"""The monitor's MLflow calls: a served version's reference, and one run per served version with a step per check.

The reference is the `drift.REFERENCE_ARTIFACT` the register stage logged into the
run that registered the version. The monitor's runs live in their own experiment
(`monitor.experiment`), tagged with the model name and version they watch, so the
UI's chart of `monitor/ks_elbo` over steps is that version's timeline.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException

from vae_mlops.drift import REFERENCE_ARTIFACT
from vae_mlops.tracking.store import ensure_experiment, error_code, mlflow_client

TAG_MODEL = "vae.monitor.model_name"
TAG_VERSION = "vae.monitor.version"
METRIC_PREFIX = "monitor/"


class MonitorTracker:
    """The store at `uri`, the monitor's experiment in it."""

    def __init__(self, uri: str, experiment: str) -> None:
        self.uri = uri
        self.client = mlflow_client(uri)
        self.experiment_id = ensure_experiment(self.client, experiment, uri)

    def reference_file(self, model_name: str, version: str, dest: Path) -> Path | None:
        """The version's reference npz downloaded under `dest`; None when the version or its reference is missing."""
        try:
            mv = self.client.get_model_version(model_name, version)
            path = self.client.download_artifacts(mv.run_id, REFERENCE_ARTIFACT, str(dest))
        except MlflowException as exc:
            if error_code(exc) in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
                return None
            raise
        except OSError:  # a local artifact store without the file
            return None
        return Path(path) if Path(path).is_file() else None

    def run_for(self, model_name: str, version: str, params: dict[str, Any]) -> str:
        """The run that watches `model_name` v`version`, created (with `params`) on its first check."""
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{TAG_MODEL}` = '{model_name}' and tags.`{TAG_VERSION}` = '{version}'",
            max_results=1,
            order_by=["attributes.start_time ASC"],
        )
        if found:
            return found[0].info.run_id
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"monitor-{model_name}-v{version}",
            tags={TAG_MODEL: model_name, TAG_VERSION: version, "mlflow.note.content": _note(model_name, version)},
        )
        self.client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
        self.client.set_terminated(run.info.run_id)  # metrics still go in; the run is not left "running"
        return run.info.run_id

    def log_check(self, run_id: str, step: int, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(METRIC_PREFIX + k, float(v), now, step) for k, v in metrics.items()])

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """(step, value) of `monitor/<key>`, by step."""
        return sorted((m.step, m.value) for m in self.client.get_metric_history(run_id, METRIC_PREFIX + key))

    def log_png(self, run_id: str, png: bytes, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_bytes(png)
            self.client.log_artifact(run_id, str(path), "monitor")


def _note(model_name: str, version: str) -> str:
    return (
        f"Recorded traffic of {model_name} v{version} against its validation split, one step per window "
        "(pipeline/monitor.py): KS of the ELBO and MMD of the latent means, each with its calibrated threshold."
    )
