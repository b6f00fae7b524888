"""The monitor: recorded windows against a registered version's reference, one drift event, and the automation.

The traffic is written by the real recorder into SQLite; the reference is an
artifact of the registered version's run in a real MLflow store; the flow runs
against a real Prefect server (`prefect_test_harness`), where the automation turns
the event into a run of the retraining deployment.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

# Before Prefect is imported: its home (profiles, local results) in a temp dir, not the repo's .prefect.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="prefect-home-")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, DeploymentFilter, DeploymentFilterId  # noqa: E402
from prefect.events import emit_event  # noqa: E402
from prefect.events.worker import EventsWorker  # noqa: E402
from prefect.settings import PREFECT_HOME, temporary_settings  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from pipeline import deploy, monitor  # noqa: E402
from pipeline.flows import in_checkout  # noqa: E402
from pipeline.retrain import RETRAIN_FLOW  # noqa: E402
from tests.support.project import ROOT  # noqa: E402
from vae_mlops import drift, tracking  # noqa: E402
from vae_mlops.inference_log import Recorder  # noqa: E402
from vae_mlops.model import VAE, VAEConfig  # noqa: E402
from vae_mlops.params import apply_overrides, load_params, read_raw  # noqa: E402
from vae_mlops.scores import served_scores  # noqa: E402
from vae_mlops.stages.register import log_reference  # noqa: E402
from vae_mlops.tracking.monitor_runs import MonitorTracker  # noqa: E402
from vae_mlops.tracking.store import mlflow_client  # noqa: E402

L = 6
WINDOW = 50
NAME = "vae-mnist"
SETTINGS = {"monitor.window": WINDOW, "monitor.calibration_rounds": 1000, "monitor.consecutive": 2,
            "monitor.cooldown_s": 3600.0, "monitor.experiment": "monitor-test"}  # fmt: skip


def _scores(n: int, rng: np.random.Generator, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """In-distribution scores; `shift` standard deviations worse ELBO (an unfamiliar kind of image)."""
    return rng.normal(-100 - 20 * shift, 20, n), rng.normal(0, 1, (n, L)).astype(np.float32)


class Site:
    """A checkout's params.yaml, its inference table, and an MLflow store with registered versions."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        (root / "params.yaml").write_text(yaml.safe_dump(apply_overrides(read_raw(ROOT / "params.yaml"), SETTINGS)))
        self.root = root
        self.params = load_params(root / "params.yaml")
        self.db = f"sqlite:///{root / '.inference' / 'inference.db'}"
        self.mlflow_uri = f"sqlite:///{root / 'mlflow.db'}"
        self.rng = np.random.default_rng(0)

    def register(self, with_reference: bool = True) -> str:
        """A new version of NAME whose run holds a reference of 2000 in-distribution images."""
        client = mlflow_client(self.mlflow_uri)
        exp = client.get_experiment_by_name("vae-mnist") or client.get_experiment(
            client.create_experiment("vae-mnist", artifact_location=(self.root / "mlartifacts").as_uri())
        )
        run_id = client.create_run(exp.experiment_id).info.run_id
        if with_reference:
            elbo, mu = _scores(2000, self.rng)
            path = self.root / "reference.npz"
            drift.Reference(elbo.astype(np.float32), mu).save(path)
            client.log_artifact(run_id, str(path), "reference")
        if not client.search_registered_models(f"name = '{NAME}'"):
            client.create_registered_model(NAME)
        return str(client.create_model_version(NAME, f"runs:/{run_id}/model", run_id=run_id).version)

    def serve(self, version: str, n: int, shift: float = 0.0) -> None:
        rec = Recorder(self.db, log_inputs=False, flush_s=0.1)
        elbo, mu = _scores(n, self.rng, shift)
        rec.record(None, np.zeros((n, 784), np.float32), model_name=NAME, version=version, elbo=elbo, mu=mu)
        rec.close()

    def monitor(self, events: list) -> monitor.MonitorReport:
        tracker = MonitorTracker(self.mlflow_uri, self.params.monitor.experiment)
        return monitor.monitor_once(self.params, self.root, on_drift=events.append, db_url=self.db, tracker=tracker)


def test_in_distribution_traffic_raises_nothing_and_a_shift_reports_one_drift(tmp_path):
    site = Site(tmp_path / "site")
    events: list[monitor.CheckRecord] = []
    assert site.monitor(events).checks == []  # nothing recorded yet: nothing to do, no error

    v1 = site.register()
    site.serve(v1, 6 * WINDOW + 20)  # six windows and a tail
    report = site.monitor(events)
    assert [c.step for c in report.checks] == [1, 2, 3, 4, 5, 6]
    assert not events and sum(c.result.over for c in report.checks) <= 1

    site.serve(v1, 4 * WINDOW - 20, shift=1.0)  # the tail fills up with shifted images; three more windows follow
    report = site.monitor(events)
    assert [c.step for c in report.checks] == [7, 8, 9, 10]
    assert [c.result.over for c in report.checks[1:]] == [True, True, True]
    # two in a row make the drift (the mixed window 7 may be the first); the cooldown keeps it to one event
    assert len(events) == 1 and events[0].step in (8, 9)
    assert report.checks[-1].drift and not report.checks[-1].event

    # every check is a step of v1's run in the monitor experiment
    client = mlflow_client(site.mlflow_uri)
    run_id = report.run_ids[f"{NAME}/{v1}"]
    history = client.get_metric_history(run_id, "monitor/ks_elbo")
    assert sorted(m.step for m in history) == list(range(1, 11))
    assert [m.step for m in client.get_metric_history(run_id, "monitor/event") if m.value] == [events[0].step]
    assert site.monitor(events).checks == []  # read up to the end: nothing is checked twice

    # a new version: its own steps and state; the old version's short tail is dropped, not left pending
    site.serve(v1, 10, shift=1.0)
    v2 = site.register()
    site.serve(v2, WINDOW)
    report = site.monitor(events)
    assert [(c.version, c.step) for c in report.checks] == [(v2, 1)]
    assert report.skipped == {f"tail of {NAME}/{v1} after the server switched versions": 10}

    # the retrained version still sees the shift: drift, but the model's cooldown holds the event back
    site.serve(v2, 3 * WINDOW, shift=1.0)
    report = site.monitor(events)
    assert any(c.drift for c in report.checks) and not any(c.event for c in report.checks) and len(events) == 1


def test_register_logs_the_reference_the_monitor_reads(tmp_path):
    """The register stage's reference: the served scores of the validation split, found through the version."""
    site = Site(tmp_path / "site")
    client = mlflow_client(site.mlflow_uri)
    exp_id = client.create_experiment("vae-mnist", artifact_location=(site.root / "mlartifacts").as_uri())
    run_id = client.create_run(exp_id).info.run_id
    torch.manual_seed(0)
    vae, x_val = VAE(VAEConfig(784, 32, L, "bernoulli")).eval(), torch.rand(300, 784)
    log_reference(tracking.PipelineRun(run_id, exp_id, site.mlflow_uri), vae, x_val)
    client.create_registered_model(NAME)
    version = client.create_model_version(NAME, f"runs:/{run_id}/model", run_id=run_id).version

    tracker = MonitorTracker(site.mlflow_uri, "monitor-test")
    ref = drift.Reference.load(tracker.reference_file(NAME, str(version), tmp_path / "dl"))
    want = served_scores(vae, x_val)
    np.testing.assert_array_equal(ref.elbo, want.elbo)
    np.testing.assert_array_equal(ref.mu, want.mu)
    assert tracker.reference_file(NAME, "99", tmp_path / "dl") is None


def test_a_version_without_a_reference_is_skipped_with_its_reason(tmp_path):
    site = Site(tmp_path / "site")
    v1 = site.register(with_reference=False)
    site.serve(v1, 2 * WINDOW)
    report = site.monitor([])
    assert report.checks == [] and report.skipped == {f"no reference for {NAME}/{v1}": 2 * WINDOW}


def test_a_corrupt_state_file_is_a_clear_error(tmp_path):
    site = Site(tmp_path / "site")
    state = site.root / ".inference" / monitor.STATE_FILE
    state.parent.mkdir(parents=True)
    state.write_text("{not json")
    with pytest.raises(Exception, match="not a monitor state"):
        site.monitor([])


# ---------------------------------------------------------------- the flow, the event and the automation


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    with temporary_settings(updates={PREFECT_HOME: str(tmp_path_factory.mktemp("prefect-home"))}):
        with prefect_test_harness(server_startup_timeout=180):
            yield
            EventsWorker.drain_all(timeout=30)


def _retraining_deployment() -> object:
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name(RETRAIN_FLOW)
        return client.create_deployment(flow_id=flow_id, name=RETRAIN_FLOW)


def _runs_of(deployment_id) -> list:
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))


@pytest.mark.slow
def test_flow_reports_the_drift_and_the_automation_retrains_once(harness, tmp_path, monkeypatch):
    site = Site(tmp_path / "site")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", site.mlflow_uri)
    monkeypatch.setenv("VAE_MONITOR_DB_URI", site.db)
    retrain = _retraining_deployment()
    deploy.declare_drift_automation(retrain, cooldown_s=3600)
    deploy.declare_drift_automation(retrain, cooldown_s=3600)  # declared again (a redeploy): updated, not doubled
    time.sleep(2)  # the triggers service loads automations when they change

    v1 = site.register()
    site.serve(v1, 2 * WINDOW)
    site.serve(v1, 3 * WINDOW, shift=1.5)
    with in_checkout(site.root):
        summary = monitor.vae_monitor()
    assert summary["checks"] == 5 and summary["drift_events"] == [f"{NAME} v{v1} check 4"]
    EventsWorker.drain_all(timeout=30)

    deadline = time.monotonic() + 120
    while not (runs := _runs_of(retrain)):
        assert time.monotonic() < deadline, "the drift event started no run of the retraining deployment"
        time.sleep(1)
    # the model drifting again within the cooldown, from the retrained version (or with the monitor's state lost):
    # no second run
    emit_event(event=monitor.DRIFT_EVENT, resource=monitor.drift_event_resource(NAME, str(int(v1) + 1)), payload={})
    EventsWorker.drain_all(timeout=30)
    time.sleep(10)
    assert len(_runs_of(retrain)) == len(runs) == 1

    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[monitor.ARTIFACT_KEY])))
    assert "data:image/png;base64," in artifact.data and "**event**" in artifact.data
