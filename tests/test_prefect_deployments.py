"""`make serve`'s server, pools, deployments and schedule, and a real `prefect worker` training for the pipeline.

Three checkouts stand for three machines: `orchestrator` runs the pipeline,
`gpu-machine` is the training worker's own clone (it sees the data only through
a shared DVC remote and logs to the same MLflow store), `broken-gpu-machine` is
a worker that cannot see the data at all.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

# Before Prefect is imported: its home (profiles, local results) in a temp dir, not the repo's .prefect.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="prefect-home-")

import psutil  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402

from tests.support.project import ROOT  # noqa: E402
from tests.support.e2e import copy_project, dvc, run  # noqa: E402

from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.filters import (  # noqa: E402
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType  # noqa: E402
from prefect.events.worker import EventsWorker  # noqa: E402
from prefect.logging.handlers import APILogWorker  # noqa: E402
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, PREFECT_HOME, temporary_settings  # noqa: E402

from pipeline import deploy, flows, local_auth, serve  # noqa: E402
from vae_mlops.params import load_params  # noqa: E402
from vae_mlops.ports import free_port  # noqa: E402

pytestmark = pytest.mark.slow

GPU_POOL = "gpu"
TIMEOUT_S = 300  # orchestrate.task_timeout_s in these runs: a lost run fails the test, not an hour later


@dataclass
class Machines:
    orchestrator: Path
    gpu: Path
    broken_gpu: Path
    remote: Path


@dataclass
class Served:
    api_url: str
    home: Path
    log: Path


@pytest.fixture(scope="module")
def machines(tmp_path_factory, tiny_mirror):
    base = tmp_path_factory.mktemp("machines")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VAE_DATA_MIRROR", str(tiny_mirror))
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{base / 'mlflow.db'}")  # the shared tracking store
        orchestrator = copy_project(base / "orchestrator", **{"train.epochs": 1})
        dvc("remote", "add", "shared", str(base / "dvc-shared"), cwd=orchestrator)
        run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "shared remote"], orchestrator)
        for name in ("gpu-machine", "broken-gpu-machine"):
            run(["git", "clone", "-q", str(orchestrator), str(base / name)], base)
        yield Machines(orchestrator, base / "gpu-machine", base / "broken-gpu-machine", base / "dvc-shared")


@pytest.fixture(scope="module")
def served(machines, tmp_path_factory):
    """`python -m pipeline.serve` (what `make serve` runs) on a free port, stopped with Ctrl-C at the end."""
    home = tmp_path_factory.mktemp("prefect-serve")
    port = free_port()
    log = home / "serve.log"
    # its server asks for the auth string `make serve` generates into VAE_CREDENTIALS_DIR
    env = serve.process_env(home, {"PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1",
                                   "VAE_CREDENTIALS_DIR": str(home / "credentials")})  # fmt: skip
    env.pop("PREFECT_API_URL", None)
    env.pop("PREFECT_API_AUTH_STRING", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.serve", "--root", str(machines.orchestrator), "--port", str(port)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    api_url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 300
        while "Ctrl-C stops it" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        auth = local_auth.prefect_env(home / "credentials")["PREFECT_API_AUTH_STRING"]
        settings = {PREFECT_API_URL: api_url, PREFECT_HOME: str(home), PREFECT_API_AUTH_STRING: auth}
        with pytest.MonkeyPatch.context() as mp, temporary_settings(updates=settings):
            mp.setenv("PREFECT_API_AUTH_STRING", auth)  # for the workers and CLIs the tests start
            yield Served(api_url, home, log)
            drain_prefect_clients()
    finally:
        children = psutil.Process(proc.pid).children(recursive=True)  # the server and worker: own sessions
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            for p in [proc, *children]:  # leave nothing running, then fail
                with contextlib.suppress(psutil.NoSuchProcess):
                    psutil.Process(p.pid).kill()
            raise
    assert not serve.port_in_use(port), "the server outlived make serve"


def drain_prefect_clients(timeout_s: float = 30) -> None:
    """Flush this process's Prefect log and event workers while their server is up.

    They are process-wide singletons bound to the server they first talked to; left
    behind, they block the next `prefect_test_harness` teardown, which drains them all.
    """
    APILogWorker.drain_all(timeout=timeout_s)
    EventsWorker.drain_all(timeout=timeout_s)


def _flow_runs(**filters) -> list:
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(**filters)


def _task_names(flow_run_id) -> set[str]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name for r in runs}


def test_serve_registers_pools_deployments_and_the_weekly_schedule(served, machines):
    params = load_params(machines.orchestrator / "params.yaml")
    cfg = params.orchestrate
    with get_client(sync_client=True) as client:
        pools = {name: client.read_work_pool(name) for name in (cfg.cpu_pool, GPU_POOL)}
        deps = {
            name: client.read_deployment_by_name(name)
            for name in ("vae-pipeline/vae-pipeline", "vae-train/vae-train", f"vae-pipeline/{deploy.SCHEDULED}")
        }
    assert {p.type for p in pools.values()} == {"process"}
    assert deps["vae-pipeline/vae-pipeline"].work_pool_name == cfg.cpu_pool
    assert deps["vae-train/vae-train"].work_pool_name == GPU_POOL
    scheduled = deps[f"vae-pipeline/{deploy.SCHEDULED}"]
    assert scheduled.work_pool_name == cfg.cpu_pool
    (schedule,) = scheduled.schedules
    assert schedule.active and schedule.schedule.cron == cfg.retrain_cron == "0 3 * * 1"
    assert schedule.schedule.timezone == cfg.timezone
    assert not deps["vae-pipeline/vae-pipeline"].schedules  # on demand only
    # no `root` to choose where `dvc repro` runs; the code is pinned to the orchestrator's commit
    head = run(["git", "rev-parse", "HEAD"], machines.orchestrator).stdout.strip()
    for dep in deps.values():
        assert "root" not in dep.parameter_openapi_schema.get("properties", {}), dep.name
        assert dep.version == head and head[:12] in dep.description

    # the server's scheduler lists the next runs: Mondays 03:00 UTC, in the future
    filters = {
        "deployment_filter": DeploymentFilter(id=DeploymentFilterId(any_=[scheduled.id])),
        "flow_run_filter": FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))),
    }
    deadline = time.monotonic() + 60
    while not (upcoming := _flow_runs(**filters)):
        assert time.monotonic() < deadline, "no scheduled runs of the retraining deployment"
        time.sleep(1)
    now = datetime.now(timezone.utc)
    for fr in upcoming:
        start = fr.expected_start_time.astimezone(timezone.utc)
        assert start > now and (start.weekday(), start.hour, start.minute) == (0, 3, 0)

    env = serve.process_env(served.home, {"PREFECT_API_URL": served.api_url, "COLUMNS": "200"})
    listed = run([serve.prefect_bin(), "deployment", "ls"], ROOT, env)
    for name in ("vae-pipeline", "vae-train", deploy.SCHEDULED):
        assert name in listed.stdout


def _pipeline_with_gpu_worker(machines: Machines, served: Served, train_source: Path, dvc_remote: str, tag: str):
    """Run vae-pipeline here with training sent to the gpu pool, served by a real `prefect worker --run-once`."""
    params = load_params(machines.orchestrator / "params.yaml")
    ids = deploy.deploy_all(machines.orchestrator, params, train_source=str(train_source))
    training_runs = {"deployment_filter": DeploymentFilter(id=DeploymentFilterId(any_=[ids["vae-train"]]))}
    before = {fr.id for fr in _flow_runs(**training_runs)}
    worker_log = served.home / f"worker-{tag}.log"
    worker: dict[str, subprocess.Popen] = {}

    def start_worker_when_training_is_queued() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if any(fr.id not in before for fr in _flow_runs(**training_runs)):
                break
            time.sleep(0.5)
        with open(worker_log, "wb") as out:
            worker["proc"] = serve.start_worker(
                GPU_POOL, served.api_url, served.home, run_once=True, stdout=out, stderr=subprocess.STDOUT
            )

    # Prefect's settings (the served API URL) live in context variables, which a new thread does not inherit
    context = contextvars.copy_context()
    launcher = threading.Thread(target=context.run, args=(start_worker_when_training_is_queued,), daemon=True)
    launcher.start()
    try:
        with flows.in_checkout(machines.orchestrator):
            state = flows.vae_pipeline(
                overrides={"orchestrate.gpu_pool": GPU_POOL, "orchestrate.task_timeout_s": TIMEOUT_S},
                dvc_remote=dvc_remote,
                return_state=True,
            )
        launcher.join(60)
        assert worker["proc"].wait(120) == 0, worker_log.read_text()
    finally:
        if "proc" in worker:
            serve.stop(worker["proc"])
    (child,) = [fr for fr in _flow_runs(**training_runs) if fr.id not in before]
    return state, child, worker_log


def test_a_gpu_worker_trains_for_the_pipeline_through_the_shared_dvc_remote(served, machines):
    state, child, worker_log = _pipeline_with_gpu_worker(
        machines, served, train_source=machines.gpu, dvc_remote="shared", tag="ok"
    )
    assert state.is_completed(), f"{state.message}\n{worker_log.read_text()[-3000:]}"
    assert child.state.is_completed() and child.work_pool_name == GPU_POOL
    assert _task_names(child.id) >= {"train", "dvc-pull-download", "dvc-push-train"}
    assert _task_names(state.state_details.flow_run_id) >= {"download", "train", "evaluate", "register"}

    # the worker trained in its own checkout; the orchestrator adopted exactly that result
    orch, gpu = machines.orchestrator, machines.gpu
    lock = {r: yaml.safe_load((r / "dvc.lock").read_text())["stages"] for r in (orch, gpu)}
    assert lock[orch]["train"] == lock[gpu]["train"]
    assert (orch / "models" / "vae.pt").read_bytes() == (gpu / "models" / "vae.pt").read_bytes()
    assert (orch / "reports" / "train_history.csv").read_text() == (gpu / "reports" / "train_history.csv").read_text()
    registration = yaml.safe_load((orch / "reports" / "registration.json").read_text())
    assert registration["decision"] and registration["version"]
    # evaluate and register logged into the run the worker opened, in the shared store
    run_file = yaml.safe_load((orch / "reports" / "mlflow_run.json").read_text())
    assert run_file == yaml.safe_load((gpu / "reports" / "mlflow_run.json").read_text())
    assert state.result()["mlflow_run_id"] == run_file["run_id"]


def test_a_failed_training_run_fails_the_pipeline_and_nothing_is_registered(served, machines):
    orch = machines.orchestrator
    watched = [orch / "reports" / n for n in ("metrics.json", "registration.json", "promotions.jsonl")]
    before = {p: p.read_bytes() if p.exists() else None for p in watched}
    # the broken worker has its own checkout but no data and no shared DVC remote: training fails there
    state, child, worker_log = _pipeline_with_gpu_worker(
        machines, served, train_source=machines.broken_gpu, dvc_remote="", tag="broken"
    )
    assert child.state.is_failed(), worker_log.read_text()[-3000:]
    assert state.is_failed()
    assert "training run" in state.message and "ended FAILED" in state.message
    tasks = _task_names(state.state_details.flow_run_id)
    assert "train" in tasks and not tasks & {"evaluate", "register"}
    assert {p: p.read_bytes() if p.exists() else None for p in watched} == before


def test_a_git_source_is_cloned_at_the_pinned_commit_and_an_unknown_commit_is_refused(served, machines):
    """Last in this module: it re-points the deployments at a git URL."""
    orch = machines.orchestrator
    params = load_params(orch / "params.yaml")
    head = run(["git", "rev-parse", "HEAD"], orch).stdout.strip()
    ids = deploy.deploy_all(orch, params, source=f"file://{orch}")
    with get_client(sync_client=True) as client:
        dep = client.read_deployment(ids["vae-pipeline"])
    clones = [s["prefect.deployments.steps.git_clone"] for s in dep.pull_steps if "prefect.deployments.steps.git_clone" in s]
    assert [c.get("commit_sha") for c in clones] == [head] and dep.version == head
    with pytest.raises(deploy.SourceError, match="has no commit '0{40}'"):
        deploy.deploy_all(orch, params, commit="0" * 40)
    assert deploy.main(["--root", str(orch), "--commit", "nope"]) == 2
