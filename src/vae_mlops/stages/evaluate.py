"""The evaluate stage: test metrics and pictures of `models/vae.pt`, into `reports/` and the pipeline's run."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from torch import Tensor

from vae_mlops import atomic, checkpoint, data, host_memory, images, metrics
from vae_mlops.datasets import get_dataset
from vae_mlops.model import VAE
from vae_mlops.params import Params
from vae_mlops.paths import Paths
from vae_mlops.tracking import PipelineRun
from vae_mlops.train import resolve_device, to_unit_float

log = logging.getLogger(__name__)


def load_test_split(params: Params, paths: Paths, device: torch.device) -> tuple[Tensor, Tensor]:
    """The test images as float32 (N, 784) on [0, 1] on the device, and their labels (N,) on the CPU."""
    spec = get_dataset(params.data.dataset)
    images_u8, labels = data.load_split(paths.raw_dir(params.data.dataset), spec, "test")
    return to_unit_float(images_u8, device), labels


def load_trained(paths: Paths, device: torch.device) -> tuple[VAE, dict]:
    model, payload = checkpoint.load_model(paths.model_file, map_location=device)
    return model.to(device).eval(), payload


def read_metrics(path: Path) -> dict[str, float]:
    """`reports/metrics.json`: flat, keyed as in `metrics.METRIC_KEYS` (`test.elbo`, ...)."""
    if not path.is_file():
        raise metrics.MetricsError([f"{path} not found: run the evaluate stage first (`dvc repro evaluate`)"])
    return json.loads(path.read_text())


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
    scores = metrics.evaluate_model(model, x, labels, params.evaluate)
    metrics.validate_metrics(scores, model.config.latent_dim)
    atomic.write_json(paths.metrics_file, scores)
    pictures = images.eval_pictures(model, x, labels, payload["history"], params.evaluate, paths.eval_images_dir)
    seconds = time.perf_counter() - t0
    log.info(
        "test ELBO %.2f, IWAE NLL %.2f (k=%d), NMI %.3f, ARI %.3f on %d images in %.1fs",
        scores["test.elbo"], scores["test.nll_iwae"], params.evaluate.iwae_samples,
        scores["latent.nmi"], scores["latent.ari"], len(x), seconds,
    )  # fmt: skip
    if run is not None:
        test_hash = data.read_manifest(paths.raw_dir(params.data.dataset))["data_hash"]  # the data scored now
        run.log_datasets({"test": (x, labels)}, params.data.dataset, test_hash)
        run.log_metrics(scores)
        run.log_metrics({"evaluate/seconds": seconds})
        run.log_files(pictures, "evaluate")
        # The run's params are fixed when train opens it; evaluate may rerun alone with other values.
        run.set_tags({"evaluate.params": json.dumps(params.to_dict()["evaluate"], sort_keys=True)})
    return scores
