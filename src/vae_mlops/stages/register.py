"""The register stage: log the model into the pipeline's run, register a version, pass it through the gate."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch

from vae_mlops import atomic, compare, metrics, registry, tracking
from vae_mlops.drift import REFERENCE_ARTIFACT, Reference
from vae_mlops.metrics import read_metrics
from vae_mlops.params import Params
from vae_mlops.paths import Paths
from vae_mlops.scores import served_scores
from vae_mlops.stage_inputs import load_test_split, load_train_data, load_trained, test_data_hash

log = logging.getLogger(__name__)


def register(params: Params, paths: Paths, run: tracking.PipelineRun) -> dict:
    """Register `models/vae.pt` under `register.model_name`; write `reports/registration.json`.

    The champion moves only through `registry.gate`; every decision is appended to
    `reports/promotions.jsonl`.
    """
    cpu = torch.device("cpu")
    model, _ = load_trained(paths, cpu)
    scores = read_metrics(paths.metrics_file)
    metrics.validate_metrics(scores, model.config.latent_dim)  # metrics.json may have been edited by hand
    test_hash = test_data_hash(params, paths)
    x, labels = load_test_split(params, paths, cpu)
    commit, _ = tracking.git_state(paths.root)
    candidate = registry.Candidate(
        model=model,
        metrics=scores,
        dataset=params.data.dataset,
        data_hash=test_hash,
        git_commit=commit,
        model_sha256=atomic.sha256_file(paths.model_file),
        input_example=x[:2].numpy(),
        binarize=params.data.binarize,
    )

    def rescore(vae) -> float:
        return metrics.evaluate_model(vae, x, labels, params.evaluate)[params.register.metric]

    # before the version exists, so whatever serves it finds its monitoring reference
    log_reference(run, model, load_train_data(params, paths, cpu).x_val)
    decision = registry.register(run, candidate, params.register, paths.promotion_log, rescore)
    result = {
        "model_name": decision.model_name,
        "version": decision.version,
        "alias": decision.alias,
        "decision": decision.decision,
        "reason": decision.reason,
        "metric": decision.metric,
        "value": decision.value,
        "champion_version": decision.champion_version,
        "champion_value": decision.champion_value,
        "model_uri": f"models:/{decision.model_name}/{decision.version}",
    }
    atomic.write_json(paths.registration_file, result)
    # the candidate against the champion it was gated against: reports/compare.{html,md}, logged to the run
    compare.registration_report(run, decision, model, (x, labels), params.evaluate, paths)
    return result


def log_reference(run: tracking.PipelineRun, model, x_val: torch.Tensor) -> None:
    """The monitor's reference: the served scores (ELBO, latent mean) of the validation split, in the run.

    `pipeline/monitor.py` compares recorded traffic with it (`drift.py`); plain float32 arrays, no pickle.
    """
    scored = served_scores(model, x_val)
    folder, name = REFERENCE_ARTIFACT.rsplit("/", 1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        Reference(scored.elbo, scored.mu).save(path)
        run.log_files({"reference": path}, folder)
