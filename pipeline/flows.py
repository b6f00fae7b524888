"""The pipeline as Prefect flows: `vae-pipeline` (every stage) and `vae-train` (training alone).

Each task runs one DVC stage (`dvc repro --single-item <stage>`), so the stage
code is the one `dvc repro` runs and `dvc.lock` and the DVC cache stay true. The
task list is `dvc.yaml`'s stages in order; `train` is the `vae-train` flow, run
in-process or, when `orchestrate.gpu_pool` names a work pool, as a deployment on
that pool. `python -m pipeline.flows` (`make flow`) runs the pipeline on
Prefect's ephemeral API. See docs/prefect.md.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Iterator, Mapping

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
from prefect.deployments import run_deployment
from prefect.runtime import deployment, flow_run
from prefect.states import Cancelling
from prefect.tasks import exponential_backoff

from pipeline import dvcrun, notify
from vae_mlops import cli_args
from vae_mlops.errors import VaeMlopsError
from vae_mlops.params import Params, ParamsError, load_params
from vae_mlops.paths import Paths

PIPELINE_FLOW = "vae-pipeline"
TRAIN_FLOW = "vae-train"
TRAIN_DEPLOYMENT = f"{TRAIN_FLOW}/{TRAIN_FLOW}"
HANDOFF_KEY = "vae-train-handoff"
SUMMARY_KEY = "vae-pipeline-summary"
COMPARE_KEY = "vae-pipeline-compare"
REMOTE_ENV = "VAE_DVC_REMOTE"  # a DVC remote shared with the GPU worker; "" or unset: none
NETWORK_STAGES = ("download", "register")  # retried with backoff
HANDOFF_RE_START = "```json\n"


class TrainingFailed(VaeMlopsError):
    """The training run ended in a state other than Completed, or its outputs did not arrive."""


class WorkspaceBusy(VaeMlopsError):
    """Another pipeline run is using this checkout."""


class SourceMoved(VaeMlopsError):
    """A deployment's run found its checkout at another commit than the deployment was pinned to."""


# ---------------------------------------------------------------- parameters


CODE_CHECKOUT = Path(__file__).resolve().parents[1]  # the checkout holding this code (a deployment's source)
_checkout: ContextVar[Path | None] = ContextVar("vae_checkout", default=None)


def resolve_root(root: str | Path | None) -> Path:
    """The checkout to run in: `root`, or the one holding this file (a deployment's pulled source)."""
    return Path(root).resolve() if root else CODE_CHECKOUT


def checkout() -> Path:
    """Where the flows run: the checkout holding their code, unless an in-process caller chose one.

    Not a flow parameter: whoever can trigger a deployment must not choose where `dvc repro` runs.
    """
    return _checkout.get() or CODE_CHECKOUT


@contextmanager
def in_checkout(root: str | Path) -> Iterator[Path]:
    """Run the flows called in this block in `root` (`python -m pipeline.flows --root`, tests)."""
    token = _checkout.set(Path(root).resolve())
    try:
        yield Path(root).resolve()
    finally:
        _checkout.reset(token)


def check_pinned_commit(root: Path) -> None:
    """A deployment's run refuses a checkout whose HEAD is not the commit the deployment was pinned to."""
    pinned = deployment.version if deployment.id else None
    if not pinned or not re.fullmatch(r"[0-9a-f]{40}", pinned):
        return  # not a deployment run (make flow, tests), or one not made by pipeline.deploy
    head = git_head(root)
    if head != pinned:
        raise SourceMoved(
            f"deployment {deployment.name!r} is pinned to commit {pinned}, but {root} is at {head or 'no commit'}. "
            "Redeploy from the checkout you mean to run (`python -m pipeline.deploy`, or restart `make serve`)."
        )


def git_head(root: Path) -> str | None:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=30)
    return proc.stdout.strip() if proc.returncode == 0 else None


def merge_overrides(overrides: Mapping[str, Any] | None = None, **named: Any) -> dict[str, Any]:
    """The flow's `overrides` dict plus its named shortcuts, as dotted keys; a conflict is an error."""
    shortcuts = {"epochs": "train.epochs", "latent_dim": "model.latent_dim", "dataset": "data.dataset"}
    merged = dict(overrides or {})
    problems = [f"{k}: use a dotted key such as train.epochs" for k in merged if "." not in str(k)]
    for name, value in named.items():
        if value is None:
            continue
        key = shortcuts[name]
        if key in merged and merged[key] != value:
            problems.append(f"{key}: given twice ({merged[key]!r} in overrides, {value!r} as {name})")
        merged[key] = value
    if problems:
        raise ParamsError(problems, "the flow parameters")
    return merged


def validate(root: Path, overrides: Mapping[str, Any]) -> Params:
    """params.yaml with the overrides applied, validated: every problem in one `ParamsError`."""
    return load_params(root / "params.yaml", overrides)


def retry_policy(params: Params) -> tuple[int, float]:
    return params.orchestrate.retries, float(params.orchestrate.retry_delay_s)


@contextmanager
def workspace_lock(root: Path) -> Iterator[None]:
    """One pipeline run per checkout: params.yaml and the stages' outputs are shared state."""
    path = root / ".dvc" / "tmp" / "vae-pipeline.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkspaceBusy(f"another {PIPELINE_FLOW} run is using {root}; wait for it or cancel it") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ---------------------------------------------------------------- tasks


@task(cache_policy=NO_CACHE, persist_result=False)
def run_stage(stage: str, root: str, timeout_s: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """One DVC stage: `dvc repro --single-item <stage>`, its output in this task's log."""
    start = time.monotonic()
    ran = dvcrun.repro(stage, Path(root), get_run_logger(), timeout_s, dvcrun.tool_env(env))
    return {"stage": stage, "ran": ran, "seconds": round(time.monotonic() - start, 1)}


@task(cache_policy=NO_CACHE, persist_result=False)
def dvc_transfer(action: str, stages: list[str], remote: str, root: str, timeout_s: float) -> None:
    """`dvc push` or `dvc pull` of the stages' cached outputs through the shared remote."""
    dvcrun.transfer(action, stages, remote, Path(root), get_run_logger(), timeout_s)


def stage_task(stage: str, params: Params):
    """The task for a stage: named after it, with a timeout, and retries if it talks to the network."""
    timeout_s = params.orchestrate.task_timeout_s
    opts: dict[str, Any] = {"name": stage, "task_run_name": stage, "timeout_seconds": timeout_s}
    if stage in NETWORK_STAGES:
        retries, delay = retry_policy(params)
        opts.update(retries=retries, retry_delay_seconds=exponential_backoff(delay), retry_jitter_factor=0.2)
    return run_stage.with_options(**opts)


def transfer_task(action: str, stages: list[str], params: Params):
    retries, delay = retry_policy(params)
    return dvc_transfer.with_options(
        name=f"dvc-{action}", task_run_name=f"dvc-{action}-{'-'.join(stages)}",
        timeout_seconds=params.orchestrate.task_timeout_s,
        retries=retries, retry_delay_seconds=exponential_backoff(delay), retry_jitter_factor=0.2,
    )  # fmt: skip


# ---------------------------------------------------------------- the training flow


def resolve_remote(dvc_remote: str | None) -> str:
    return (os.environ.get(REMOTE_ENV, "") if dvc_remote is None else dvc_remote).strip()


@flow(
    name=TRAIN_FLOW,
    description="Train the VAE (the `train` DVC stage), on whatever machine runs it.",
    on_failure=[notify.on_run_failed],
    on_crashed=[notify.on_run_failed],
)
def vae_train(
    overrides: dict[str, Any] | None = None,
    dvc_remote: str | None = None,
    upstream: dict[str, Any] | None = None,
    run_tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Train; on a worker with a shared DVC remote, pull the data first and push the model after.

    Args:
        overrides: dotted-key params (`{"train.epochs": 3}`), written to params.yaml like `dvc exp run -S`.
        dvc_remote: a DVC remote shared with the orchestrating machine; default `$VAE_DVC_REMOTE`; "": none.
        upstream: `dvc.lock` entries of the stages before train, from the orchestrating machine.
        run_tags: tags for the MLflow run training opens (through MLflow's `MLFLOW_RUN_CONTEXT`).
    """
    logger = get_run_logger()
    root_dir = checkout()
    check_pinned_commit(root_dir)
    merged = merge_overrides(overrides)
    params = validate(root_dir, merged)
    changed = dvcrun.set_params(root_dir / "params.yaml", merged)
    if changed:
        logger.info("params.yaml: set %s", ", ".join(f"{k}={merged[k]!r}" for k in changed))
    remote = resolve_remote(dvc_remote)
    before, _ = dvcrun.split_at_train(dvcrun.stage_names(root_dir))
    if remote and before:
        if upstream:
            dvcrun.merge_lock(root_dir, dvcrun.check_upstream(root_dir, upstream, before))
        transfer_task("pull", before, params)(action="pull", stages=before, remote=remote, root=str(root_dir),
                                              timeout_s=params.orchestrate.task_timeout_s)  # fmt: skip
    tags = {**(run_tags or {}), "prefect.flow_run_id": str(flow_run.id), "prefect.flow_run_name": str(flow_run.name)}
    result = stage_task(dvcrun.TRAIN, params)(
        stage=dvcrun.TRAIN, root=str(root_dir), timeout_s=params.orchestrate.task_timeout_s,
        env={"MLFLOW_RUN_CONTEXT": json.dumps(tags)},
    )  # fmt: skip
    if remote:
        transfer_task("push", [dvcrun.TRAIN], params)(action="push", stages=[dvcrun.TRAIN], remote=remote,
                                                      root=str(root_dir), timeout_s=params.orchestrate.task_timeout_s)  # fmt: skip
    data = dvcrun.handoff(root_dir, dvcrun.TRAIN, extra_files=[Paths(root_dir).train_run_file])
    create_markdown_artifact(handoff_markdown(data, remote), key=HANDOFF_KEY, description="vae-train outputs")
    return {**result, "remote": remote, "lock": data["lock"]}


def handoff_markdown(data: Mapping[str, Any], remote: str) -> str:
    """The training outputs for people (a table) and for the orchestrating flow (the JSON block)."""
    entry = next(iter(data["lock"].values())) or {}
    rows = "\n".join(
        f"| `{o['path']}` | `{o.get('md5', '')}` | {o.get('size', '')} |" for o in entry.get("outs", [])
    )
    where = f"pushed to DVC remote `{remote}`" if remote else "left in this checkout (no DVC remote)"
    return (
        f"## vae-train outputs\n\nCached outputs {where}.\n\n| output | md5 | bytes |\n| --- | --- | --- |\n{rows}\n\n"
        f"The orchestrating flow adopts this `dvc.lock` entry and these small uncached files:\n\n"
        f"{HANDOFF_RE_START}{dvcrun.handoff_json(data)}\n```\n"
    )


def read_handoff(flow_run_id) -> dict[str, Any]:
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[HANDOFF_KEY]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
            )
        )
    if not artifacts:
        raise TrainingFailed(f"the training run {flow_run_id} left no '{HANDOFF_KEY}' artifact")
    text = str(artifacts[0].data)
    try:
        start = text.index(HANDOFF_RE_START) + len(HANDOFF_RE_START)
        return json.loads(text[start : text.index("\n```", start)])
    except ValueError as exc:  # no JSON block, or not JSON
        raise dvcrun.HandoffRefused(
            f"the '{HANDOFF_KEY}' artifact of training run {flow_run_id} holds no readable JSON block ({exc}); "
            "nothing was written"
        ) from None


# ---------------------------------------------------------------- training on a work pool


@task(name="train", task_run_name="train", cache_policy=NO_CACHE, persist_result=False)
def train_on_pool(pool: str, root: str, parameters: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Run the `vae-train` deployment on `pool`, wait for it, and adopt its outputs here.

    A run that fails, crashes, is cancelled or outlives `timeout_s` raises, so
    nothing after train runs.
    """
    logger = get_run_logger()
    run = run_deployment(TRAIN_DEPLOYMENT, parameters=parameters, timeout=timeout_s, poll_interval=2)
    state = run.state
    if state is None or not state.is_final():
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(run.id, Cancelling(message=f"no result within {timeout_s:g} s"), force=True)
        raise TrainingFailed(f"training run {run.name} on work pool '{pool}' did not finish within {timeout_s:g} s")
    if not state.is_completed():
        raise TrainingFailed(
            f"training run {run.name} on work pool '{pool}' ended {state.type.value}: {state.message}. "
            "Nothing after train runs; see that run's logs."
        )
    logger.info("training run %s completed on work pool '%s'", run.name, pool)
    root_dir = Path(root)
    dvcrun.adopt(root_dir, read_handoff(run.id))
    remote = parameters.get("dvc_remote") or ""
    if remote:
        dvcrun.transfer("pull", [dvcrun.TRAIN], remote, root_dir, logger, timeout_s)
    missing = dvcrun.missing_cached_outputs(root_dir, dvcrun.TRAIN)
    if missing:
        raise TrainingFailed(
            f"training ran on another checkout and {', '.join(missing)} did not arrive here: give both machines "
            f"a shared DVC remote (flow parameter dvc_remote or ${REMOTE_ENV})"
        )
    return {"stage": dvcrun.TRAIN, "ran": True, "flow_run": run.name, "pool": pool}


def train_step(params: Params, root: Path, overrides: dict[str, Any], remote: str, before: list[str]) -> dict:
    """Training in-process (no GPU pool configured) or as a deployment on the GPU pool."""
    tags = {"prefect.parent_flow_run_id": str(flow_run.id), "vae.overrides": json.dumps(overrides, sort_keys=True)}
    pool = params.orchestrate.gpu_pool
    if not pool:
        out = vae_train(overrides=overrides, dvc_remote="", run_tags=tags)
        return {k: out[k] for k in ("stage", "ran", "seconds")}
    timeout_s = params.orchestrate.task_timeout_s
    if remote and before:
        transfer_task("push", before, params)(action="push", stages=before, remote=remote, root=str(root),
                                              timeout_s=timeout_s)  # fmt: skip
    lock = dvcrun.read_lock(root)
    parameters = {
        # every value as params.yaml holds it here, so the worker's checkout trains on the same params
        "overrides": dvcrun.flat_raw(root / "params.yaml"),
        "dvc_remote": remote,
        "upstream": {s: lock[s] for s in before if s in lock},
        "run_tags": tags,
    }
    return train_on_pool.with_options(timeout_seconds=timeout_s + 60)(
        pool=pool, root=str(root), parameters=parameters, timeout_s=timeout_s
    )


# ---------------------------------------------------------------- the pipeline flow


@flow(
    name=PIPELINE_FLOW,
    description="download -> train -> evaluate -> register, each a DVC stage.",
    on_completion=[notify.on_pipeline_completed],  # a promotion or a gate refusal
    on_failure=[notify.on_run_failed],
    on_crashed=[notify.on_run_failed],
)
def vae_pipeline(
    overrides: dict[str, Any] | None = None,
    epochs: int | None = None,
    latent_dim: int | None = None,
    dataset: str | None = None,
    dvc_remote: str | None = None,
) -> dict[str, Any]:
    """Every stage of dvc.yaml in order; params.yaml's values unless overridden.

    Args:
        overrides: dotted-key params (`{"train.epochs": 3}`); `epochs`, `latent_dim` and
            `dataset` are shortcuts. Validated before any work; written to params.yaml
            like `dvc exp run -S`, so dvc.lock records them and MLflow logs them.
        dvc_remote: a DVC remote shared with the GPU worker; default `$VAE_DVC_REMOTE`.
    """
    logger = get_run_logger()
    root_dir = checkout()
    check_pinned_commit(root_dir)
    merged = merge_overrides(overrides, epochs=epochs, latent_dim=latent_dim, dataset=dataset)
    params = validate(root_dir, merged)
    with workspace_lock(root_dir):
        changed = dvcrun.set_params(root_dir / "params.yaml", merged)
        if changed:
            logger.info("params.yaml: set %s (as `dvc exp run -S` would)", ", ".join(f"{k}={merged[k]!r}" for k in changed))
        before, after = dvcrun.split_at_train(dvcrun.stage_names(root_dir))
        timeout_s = params.orchestrate.task_timeout_s
        results: dict[str, dict] = {}
        for stage in before:
            results[stage] = stage_task(stage, params)(stage=stage, root=str(root_dir), timeout_s=timeout_s)
        results[dvcrun.TRAIN] = train_step(params, root_dir, merged, resolve_remote(dvc_remote), before)
        for stage in after:
            results[stage] = stage_task(stage, params)(stage=stage, root=str(root_dir), timeout_s=timeout_s)
        summary = summarise(root_dir, results, merged)
        create_markdown_artifact(summary_markdown(summary), key=SUMMARY_KEY, description="vae-pipeline run summary")
        compare_md = Paths(root_dir).compare_md  # register's report: the candidate against its champion
        if compare_md.is_file():
            create_markdown_artifact(compare_md.read_text(), key=COMPARE_KEY,
                                     description="candidate vs champion; the pictures are in reports/compare.html")  # fmt: skip
    return summary


# ---------------------------------------------------------------- the summary artifact


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + "/") if isinstance(v, Mapping) else {key: v})
    return out


def mlflow_url(run: Mapping[str, Any], root: Path) -> str | None:
    """The run's page: on the tracking server, or on `make ui` for a local store."""
    run_id, exp = run.get("run_id"), run.get("experiment_id")
    if not run_id:
        return None
    uri = str(run.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root}/mlflow.db")
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{exp}/runs/{run_id}" if exp else f"{base}/#/runs/{run_id}"


def summarise(root: Path, results: Mapping[str, dict], overrides: Mapping[str, Any]) -> dict[str, Any]:
    paths = Paths(root)
    run = _read_json(paths.train_run_file)
    return {
        "flow_run": str(flow_run.name),
        "overrides": dict(overrides),
        "stages": {k: {"ran": v.get("ran"), "seconds": v.get("seconds")} for k, v in results.items()},
        "metrics": _flatten(_read_json(paths.metrics_file)),
        "mlflow_run_id": run.get("run_id"),
        "mlflow_url": mlflow_url(run, root),
        "registration": _read_json(paths.registration_file),
    }


def summary_markdown(s: Mapping[str, Any]) -> str:
    def table(head: tuple[str, str], rows: Mapping[str, Any]) -> str:
        body = "\n".join(f"| {k} | {v} |" for k, v in rows.items()) or "| (none) | |"
        return f"| {head[0]} | {head[1]} |\n| --- | --- |\n{body}\n"

    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else f"`{v}`"

    stages = {
        k: ("ran" if v["ran"] else "up to date (skipped by DVC)") + (f", {v['seconds']} s" if v.get("seconds") else "")
        for k, v in s["stages"].items()
    }
    reg = s["registration"]
    decision = ", ".join(f"{k}: {fmt(reg[k])}" for k in ("decision", "version", "alias", "reason") if k in reg)
    mlflow_line = f"`{s['mlflow_run_id']}` ([open]({s['mlflow_url']}))" if s["mlflow_run_id"] else "not recorded"
    return (
        f"# vae-pipeline run `{s['flow_run']}`\n\n"
        f"**Overrides:** {fmt(json.dumps(s['overrides'], sort_keys=True)) if s['overrides'] else 'none (params.yaml)'}\n\n"
        f"## Stages\n\n{table(('stage', 'result'), stages)}\n"
        f"## Test metrics\n\n{table(('metric', 'value'), {k: fmt(v) for k, v in s['metrics'].items()})}\n"
        f"## MLflow\n\nRun: {mlflow_line}\n\n"
        f"## Model Registry\n\n{decision or 'no registration recorded'}\n"
    )


# ---------------------------------------------------------------- `python -m pipeline.flows`


def main(argv: list[str] | None = None) -> int:
    """Run `vae-pipeline` once; a bad param is one error before Prefect starts."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.flows", description=__doc__.splitlines()[0])
    cli_args.add_set_arg(parser)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--latent-dim", type=int)
    parser.add_argument("--dataset")
    cli_args.add_root_arg(parser, default=None, help="the checkout (default: the one holding this code)")
    parser.add_argument("--dvc-remote", help=f"DVC remote shared with a GPU worker (default ${REMOTE_ENV})")
    args = parser.parse_args(argv)
    named = {"epochs": args.epochs, "latent_dim": args.latent_dim, "dataset": args.dataset}
    try:
        overrides = cli_args.overrides(args)
        validate(resolve_root(args.root), merge_overrides(overrides, **named))
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with in_checkout(resolve_root(args.root)):
        state = vae_pipeline(overrides=overrides, dvc_remote=args.dvc_remote, return_state=True, **named)
    if not state.is_completed():
        print(f"error: {PIPELINE_FLOW} ended {state.type.value}: {state.message}", file=sys.stderr)
        return 1
    print(json.dumps(state.result(), indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
