"""The evaluate stage: test metrics and pictures of `models/vae.pt`, into `reports/` and the pipeline's run."""

from __future__ import annotations

import json
import logging
import time


from vae_mlops import atomic, host_memory, images, metrics
from vae_mlops.params import Params
from vae_mlops.stage_inputs import load_probe_split, load_test_split, load_trained, test_data_hash
from vae_mlops.paths import Paths
from vae_mlops.tracking import PipelineRun
from vae_mlops.train import resolve_device

log = logging.getLogger(__name__)


def evaluate(params: Params, paths: Paths, run: PipelineRun | None = None) -> dict[str, float]:
    """Score the trained model on the test split; write `reports/metrics.json` and `reports/evaluate/*.png`.

    The metrics are validated before anything is written: a model whose numbers
    are not finite or out of range leaves no metrics file and is never registered.
    """
    t0 = time.perf_counter()
    host_memory.keep_freed_memory()  # the IWAE loop's chunk buffers are fresh every batch
    device = resolve_device(params.train.device)
    model, payload = load_trained(paths, device)
    x, labels = load_test_split(params, paths, device)
    scores = metrics.evaluate_model(model, x, labels, params.evaluate, train=load_probe_split(params, paths, device))
    metrics.validate_metrics(scores, model.config.latent_dim)
    atomic.write_json(paths.metrics_file, scores)
    pictures = images.eval_pictures(model, x, labels, payload["history"], params.evaluate, paths.eval_images_dir)
    seconds = time.perf_counter() - t0
    log.info(
        "test ELBO %.2f, IWAE NLL %.2f (k=%d), NMI %.3f, ARI %.3f on %d images in %.1fs",
        scores["test.elbo"], scores["test.nll_iwae"], params.evaluate.iwae_samples,
        scores["latent.nmi"], scores["latent.ari"], len(x), seconds,
    )  # fmt: skip
    if "latent.mixture_accuracy" in scores:
        log.info(
            "the mixture's own clusters: accuracy %.3f, NMI %.3f, ARI %.3f; linear probe %.3f",
            scores["latent.mixture_accuracy"], scores["latent.mixture_nmi"], scores["latent.mixture_ari"],
            scores["latent.probe_accuracy"],
        )  # fmt: skip
    if run is not None:
        run.log_datasets({"test": (x, labels)}, params.data.dataset, test_data_hash(params, paths))
        run.log_metrics(scores)
        run.log_metrics({"evaluate/seconds": seconds})
        run.log_files(pictures, "evaluate")
        # The run's params are fixed when train opens it; evaluate may rerun alone with other values.
        run.set_tags({"evaluate.params": json.dumps(params.to_dict()["evaluate"], sort_keys=True)})
    return scores
