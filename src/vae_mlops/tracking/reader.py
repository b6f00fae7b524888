"""Read-only calls on a store for the comparison report: runs, metric histories, runs by tag, versions."""

from __future__ import annotations

from dataclasses import dataclass

from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException

from vae_mlops.tracking.registry_client import VersionInfo
from vae_mlops.tracking.store import error_code, mlflow_client


@dataclass(frozen=True)
class RunSummary:
    """A finished run as plain data: what the comparison report shows of it."""

    run_id: str
    name: str
    experiment_id: str
    metrics: dict[str, float]
    params: dict[str, str]
    tags: dict[str, str]


class RunReader:
    """Read-only calls on a store: runs, metric histories, runs by tag, registered versions."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.client = mlflow_client(uri)

    def run(self, run_id: str) -> RunSummary | None:
        """The run, or None when the store has no run with this id."""
        try:
            run = self.client.get_run(run_id)
        except MlflowException as exc:
            if error_code(exc) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise
        d = run.data
        return RunSummary(run.info.run_id, run.info.run_name or "", run.info.experiment_id,
                          dict(d.metrics), dict(d.params), dict(d.tags))  # fmt: skip

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """(step, value) of a stepped metric, one value per step (the last logged: a resumed run logs again)."""
        last: dict[int, tuple[int, float]] = {}
        for m in self.client.get_metric_history(run_id, key):
            if m.step not in last or m.timestamp >= last[m.step][0]:
                last[m.step] = (m.timestamp, m.value)
        return [(step, value) for step, (_, value) in sorted(last.items())]

    def runs_tagged(self, key: str, value: str) -> list[str]:
        """Ids of the runs in any active experiment whose tag `key` equals `value`, newest first."""
        ids = [e.experiment_id for e in self.client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
        if not ids:
            return []
        quoted = value.replace("\\", "\\\\").replace("'", "\\'")
        runs = self.client.search_runs(ids, f"tags.`{key}` = '{quoted}'", order_by=["attributes.start_time DESC"])
        return [r.info.run_id for r in runs]

    def model_version(self, name: str, version_or_alias: str) -> VersionInfo | None:
        """A registered version by number or alias, or None when there is no such version."""
        try:
            if version_or_alias.isdigit():
                mv = self.client.get_model_version(name, version_or_alias)
            else:
                mv = self.client.get_model_version_by_alias(name, version_or_alias)
        except MlflowException as exc:
            if error_code(exc) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise
        return VersionInfo(str(mv.version), mv.run_id, dict(mv.tags))

    def versions_of_run(self, run_id: str) -> list[tuple[str, VersionInfo]]:
        """(registered model name, version) of every version registered from this run."""
        found = self.client.search_model_versions(f"run_id = '{run_id}'")
        return [(mv.name, VersionInfo(str(mv.version), mv.run_id, dict(mv.tags))) for mv in found]
