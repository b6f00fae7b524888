"""The register stage: log the model into the pipeline's run, register a version, pass it through the gate."""

from __future__ import annotations

import logging

import torch

from vae_mlops import atomic, compare, data, metrics, registry, tracking
from vae_mlops.params import Params
from vae_mlops.paths import Paths
from vae_mlops.stages.evaluate import load_test_split, load_trained, read_metrics

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
    manifest = data.read_manifest(paths.raw_dir(params.data.dataset))
    x, labels = load_test_split(params, paths, cpu)
    commit, _ = tracking.git_state(paths.root)
    candidate = registry.Candidate(
        model=model,
        metrics=scores,
        dataset=params.data.dataset,
        data_hash=manifest["data_hash"],
        git_commit=commit,
        model_sha256=atomic.sha256_file(paths.model_file),
        input_example=x[:2].numpy(),
    )

    def rescore(vae) -> float:
        return metrics.evaluate_model(vae, x, labels, params.evaluate)[params.register.metric]

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
