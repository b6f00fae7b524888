"""Work pools, deployments and the drift automation.

Deployments: `vae-pipeline` (cpu pool), `vae-train` (gpu pool), `scheduled-retraining`,
`vae-monitor` (cpu pool, on `monitor.cron`) and `vae-retrain` (cpu pool: collect the
recorded traffic as a snapshot, then the pipeline on it). The automation
`vae-drift-retrain` runs `vae-retrain` when `pipeline/monitor.py` emits
`vae.drift.detected`, at most once per registered model per `monitor.cooldown_s`.

All three are worker deployments made with `flow.from_source(...)`: a `process`
worker pulls the source (a local checkout, or a git URL for workers on other
machines) and runs the flow there. None is made with `flow.serve`, so every
deployment is picked up by a worker, never by a serving process. Every
deployment is pinned to one git commit (its `version`): a git source is cloned
at that commit, and a run in a local checkout that has moved on is refused.
The flows take no `root` parameter: whoever triggers a run cannot choose where
`dvc repro` runs.

    python -m pipeline.deploy [--source GIT_URL_OR_PATH] [--commit SHA]

needs `PREFECT_API_URL` (a self-hosted server or Prefect Cloud); `make serve`
runs it against a local server. Pools, cron and timezone come from params.yaml's
`orchestrate` section.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from uuid import UUID

from prefect import Flow
from prefect.automations import Automation
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.events.actions import RunDeployment
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.exceptions import ObjectNotFound
from prefect.runner.storage import GitRepository
from prefect.schedules import Cron
from prefect.workers.process import ProcessWorker

from pipeline import console
from pipeline.flows import PIPELINE_FLOW, REMOTE_ENV, TRAIN_FLOW, resolve_root
from pipeline.monitor import DRIFT_EVENT, MONITOR_FLOW, RESOURCE_PREFIX
from pipeline.retrain import ENTRYPOINT as RETRAIN_ENTRYPOINT
from pipeline.retrain import RETRAIN_FLOW
from vae_mlops import cli_args, inference_log
from vae_mlops.errors import VaeMlopsError
from vae_mlops.params import Params, load_params

SCHEDULED = "scheduled-retraining"
DEFAULT_GPU_POOL = "gpu"  # where vae-train is deployed while orchestrate.gpu_pool is "" (in-process)
DRIFT_AUTOMATION = "vae-drift-retrain"
ENTRYPOINTS = {
    PIPELINE_FLOW: "pipeline/flows.py:vae_pipeline",
    TRAIN_FLOW: "pipeline/flows.py:vae_train",
    MONITOR_FLOW: "pipeline/monitor.py:vae_monitor",
    RETRAIN_FLOW: RETRAIN_ENTRYPOINT,
}
# Passed to every flow run a worker starts, when set where the deployments are made. The inference
# table's URLs only when they hold no password: the worker's own environment gives that
# (VAE_MONITOR_DB_PASSWORD), so no secret is stored in a deployment.
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", REMOTE_ENV)
FORWARDED_URLS = ("VAE_MONITOR_DB_URI", "VAE_INFERENCE_DB_URI")


def train_pool(params: Params) -> str:
    return params.orchestrate.gpu_pool or DEFAULT_GPU_POOL


def ensure_pools(names: list[str]) -> list[str]:
    """Create the `process` work pools that do not exist yet; return the ones created."""
    created = []
    with get_client(sync_client=True) as client:
        for name in dict.fromkeys(names):
            try:
                client.read_work_pool(name)
            except ObjectNotFound:
                client.create_work_pool(
                    WorkPoolCreate(
                        name=name, type="process", base_job_template=ProcessWorker.get_default_base_job_template()
                    )
                )
                created.append(name)
    return created


def job_env() -> dict[str, str]:
    env = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1"}
    env.update({k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)})
    env.update({k: os.environ[k] for k in FORWARDED_URLS if os.environ.get(k) and not inference_log.has_password(os.environ[k])})
    return env


class SourceError(VaeMlopsError):
    """A deployment's source cannot be pinned to a commit."""


def resolve_commit(root: Path, commit: str | None = None) -> str:
    """The full sha of `commit` (default HEAD) in the checkout `root`."""
    rev = f"{commit or 'HEAD'}^{{commit}}"
    proc = subprocess.run(["git", "rev-parse", "--verify", "--quiet", rev], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        what = f"commit {commit!r}" if commit else "a commit (HEAD)"
        raise SourceError(f"{root} has no {what}: deployments are pinned to a git commit; commit, then deploy")
    return proc.stdout.strip()


def pinned_source(source: str, commit: str) -> str | GitRepository:
    """What `Flow.from_source` takes, pinned to `commit`.

    A git URL is cloned by the worker at that commit. A local checkout runs in
    place (its data, DVC cache and store are there): it must be at `commit`, and
    each run checks that it still is (`flows.check_pinned_commit`).
    """
    path = Path(source)
    if not path.is_dir():
        return GitRepository(url=source, commit_sha=commit)
    head = resolve_commit(path)
    if head != commit:
        raise SourceError(
            f"the source checkout {path} is at {head}, not at the commit to deploy ({commit}); "
            "check that commit out there, or deploy what it holds with --commit"
        )
    return str(path.resolve())


def deploy_all(
    root: Path, params: Params, source: str | None = None, train_source: str | None = None, commit: str | None = None
) -> dict[str, UUID]:
    """Create or update the pools and the three deployments, pinned to one commit; return their ids by name.

    The flows take no `root`: a run works in the checkout holding its code.

    Args:
        source: where workers get the code: a local checkout (default `root`) or a git URL.
        train_source: the same for `vae-train` alone (a GPU machine's own checkout), default `source`.
        commit: the commit to pin (default: `root`'s HEAD); each deployment's `version` names it.
    """
    cfg = params.orchestrate
    pin = resolve_commit(root, commit)
    ensure_pools([cfg.cpu_pool, train_pool(params)])
    src = source or str(root)
    pipeline = Flow.from_source(pinned_source(src, pin), ENTRYPOINTS[PIPELINE_FLOW])
    monitor = Flow.from_source(pinned_source(src, pin), ENTRYPOINTS[MONITOR_FLOW])
    retrain = Flow.from_source(pinned_source(src, pin), ENTRYPOINTS[RETRAIN_FLOW])
    train = Flow.from_source(pinned_source(train_source or src, pin), ENTRYPOINTS[TRAIN_FLOW])
    common = {
        "build": False, "push": False, "print_next_steps": False, "ignore_warnings": True,
        "job_variables": {"env": job_env()}, "version": pin,
    }  # fmt: skip
    at = f" Code: commit {pin[:12]}."
    ids = {
        PIPELINE_FLOW: pipeline.deploy(
            name=PIPELINE_FLOW, work_pool_name=cfg.cpu_pool, concurrency_limit=1, tags=["vae"],
            description="The whole pipeline on demand: download -> train -> evaluate -> register." + at, **common,
        ),
        TRAIN_FLOW: train.deploy(
            name=TRAIN_FLOW, work_pool_name=train_pool(params), tags=["vae", "gpu"],
            description="Training alone, on the GPU pool; vae-pipeline triggers it when orchestrate.gpu_pool is set."
            + at,
            **common,
        ),
        SCHEDULED: pipeline.deploy(
            name=SCHEDULED, work_pool_name=cfg.cpu_pool, concurrency_limit=1, tags=["vae", "scheduled"],
            schedule=Cron(cfg.retrain_cron, timezone=cfg.timezone),
            description=f"Retrain on `{cfg.retrain_cron}` ({cfg.timezone}); the registry gate decides promotion." + at,
            **common,
        ),
        MONITOR_FLOW: monitor.deploy(
            name=MONITOR_FLOW, work_pool_name=cfg.cpu_pool, concurrency_limit=1, tags=["vae", "monitor"],
            schedule=Cron(params.monitor.cron, timezone=cfg.timezone),
            description=f"Recorded traffic against the served version's reference on `{params.monitor.cron}`; "
            f"a drift emits {DRIFT_EVENT}." + at,
            **common,
        ),
        RETRAIN_FLOW: retrain.deploy(
            name=RETRAIN_FLOW, work_pool_name=cfg.cpu_pool, concurrency_limit=1, tags=["vae", "retrain"],
            description=f"On {DRIFT_EVENT}: the recorded traffic as a DVC snapshot, then the pipeline on it "
            "through the gate." + at,
            **common,
        ),
    }  # fmt: skip
    declare_drift_automation(ids[RETRAIN_FLOW], params.monitor.cooldown_s)
    return ids


def declare_drift_automation(retrain_deployment_id: UUID, cooldown_s: float) -> UUID:
    """`vae.drift.detected` -> one run of the retraining deployment, per registered model, then quiet for `cooldown_s`.

    A Reactive trigger fires on the first event and then waits out `within` before it can
    fire again: the automation's own cooldown, beside the monitor's (which emits once per
    model per cooldown). Created, or updated in place when it exists.
    """
    automation = Automation(
        name=DRIFT_AUTOMATION,
        description="A drift found by vae-monitor retrains once (pipeline/monitor.py, pipeline/deploy.py).",
        trigger=EventTrigger(
            expect={DRIFT_EVENT},
            match={"prefect.resource.id": f"{RESOURCE_PREFIX}*"},
            for_each={"prefect.resource.id"},  # each registered model has its own cooldown, across its versions
            posture=Posture.Reactive,
            threshold=1,
            within=timedelta(seconds=cooldown_s),
        ),
        actions=[RunDeployment(source="selected", deployment_id=retrain_deployment_id)],
    )
    try:
        existing = Automation.read(name=DRIFT_AUTOMATION)
    except ValueError:  # none by that name
        existing = None
    if existing is None:
        return automation.create().id
    automation.id = existing.id
    automation.update()
    return existing.id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.deploy", description=__doc__.splitlines()[0])
    cli_args.add_root_arg(parser, default=None, help="the checkout whose params.yaml to read (default: this one)")
    parser.add_argument("--source", help="where workers get the code: a path or git URL (default: --root)")
    parser.add_argument("--train-source", help="the same for vae-train alone (default: --source)")
    parser.add_argument("--commit", help="the commit to pin the deployments to (default: --root's HEAD)")
    args = parser.parse_args(argv)
    root = resolve_root(args.root)
    params = load_params(root / "params.yaml")
    try:
        ids = deploy_all(root, params, args.source, args.train_source, args.commit)
    except SourceError as exc:
        return console.fail(exc)
    console.print_named(ids)
    return 0


if __name__ == "__main__":
    sys.exit(main())
