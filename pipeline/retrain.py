"""`vae-retrain`: retraining on what the served model saw, the flow a drift runs.

collect (the recorded images since the last snapshot, screened, as a new snapshot under
`data/incoming/`) -> `dvc add` of the snapshot -> `data.snapshots` += its id -> the
`vae-pipeline` flow, whose register stage gates the new version against the champion
re-scored on the new test split. The drift monitor's automation runs this deployment.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pipeline import dvcrun
from pipeline.flows import check_pinned_commit, checkout, merge_overrides, validate, vae_pipeline
from vae_mlops.paths import Paths
from vae_mlops.collect import collect

RETRAIN_FLOW = "vae-retrain"
RETRAIN_DEPLOYMENT = f"{RETRAIN_FLOW}/{RETRAIN_FLOW}"
ENTRYPOINT = "pipeline/retrain.py:vae_retrain"


@task(name="collect", task_run_name="collect", cache_policy=NO_CACHE, persist_result=False)
def collect_task(root: str, overrides: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """A snapshot of the recorded images since the last one, tracked by DVC (`dvc add`)."""
    logger = get_run_logger()
    root_dir = Path(root)
    params = validate(root_dir, overrides)
    manifest = collect(params.data, Paths(root_dir))
    folder = Paths(root_dir).incoming_dir.relative_to(root_dir) / manifest["id"]
    dvcrun.run_logged([dvcrun.dvc_bin(), "add", str(folder)], root_dir, logger, timeout_s, dvcrun.tool_env())
    logger.info(
        "snapshot %s: %d images kept of %d received (refused: %s)", manifest["id"], manifest["count"],
        manifest["received"], manifest["rejected"],
    )  # fmt: skip
    return manifest


@flow(name=RETRAIN_FLOW, description="Collect the recorded traffic as a snapshot, then train on it through the gate.")
def vae_retrain(overrides: dict[str, Any] | None = None, drift: dict[str, Any] | None = None) -> dict[str, Any]:
    """Collect, then run `vae-pipeline` with the new snapshot added to `data.snapshots`.

    Args:
        overrides: dotted-key params for the pipeline (`{"train.epochs": 3}`).
        drift: the drift event's payload (what triggered this run), kept in the result.
    """
    root_dir = checkout()
    check_pinned_commit(root_dir)
    merged = merge_overrides(overrides)
    params = validate(root_dir, merged)
    started = time.time()
    manifest = collect_task(str(root_dir), merged, params.orchestrate.task_timeout_s)
    named = [*params.data.snapshots, manifest["id"]]
    summary = vae_pipeline(overrides={**merged, "data.snapshots": named})
    return {"started": started, "snapshot": manifest, "drift": drift or {}, "pipeline": summary}
