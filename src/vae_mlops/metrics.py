"""Test metrics of a trained VAE, clustering and linear-probe scores of its latent means; their pandera schema.

Every metric key, its direction, valid range and meaning are documented once, in
`metric_catalogue.CATALOGUE`; `METRIC_KEYS` lists them in its order.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pandera.pandas as pa
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import Tensor

from vae_mlops.errors import VaeMlopsError
from vae_mlops.metric_catalogue import CATALOGUE, INF, METRIC_KEYS, Metric
from vae_mlops.model import VAE, elbo, iwae_log_likelihood
from vae_mlops.params import EvaluateParams
from vae_mlops.progress import eta_note

log = logging.getLogger(__name__)

ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. 2016: a unit is active if Cov_x(E[z|x]) > 0.01
KMEANS_N_INIT = 10  # restarts of k-means; the best inertia wins, so one unlucky start cannot move the scores
SILHOUETTE_SAMPLE = 5000  # silhouette is O(N^2): score a seeded subsample of this many images
PROBE_MAX_ITER = 1000  # L-BFGS iterations of the linear probe; standardised features converge well within it
# The IWAE bound is at least the ELBO in expectation (Burda et al. 2016, Theorem 1), so
# nll_iwae <= -elbo; both are Monte Carlo means over the test images, and this much slack
# absorbs their noise (well under 0.1 nats on 10,000 images, more on a tiny test set).
IWAE_TOLERANCE = 0.5


class MetricsError(VaeMlopsError, ValueError):
    """The metrics are not fit to register: every problem, one per line, each naming its key."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in the metrics:\n{lines}")


@dataclass(frozen=True)
class Encoded:
    """The test split's posterior means and what decoding them gives, averaged per image."""

    mu: Tensor  # (N, L) on the CPU
    elbo: float
    recon_mse: float
    recon_bce: float
    kl: float


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_model(
    model: VAE, x: Tensor, labels: Tensor, cfg: EvaluateParams, train: tuple[Tensor, Tensor] | None = None
) -> dict[str, float]:
    """Every metric of `METRIC_KEYS` for images `x` (N, 784) on [0, 1] and their labels; a mixture's own too.

    `train` (images, labels) fits the linear probe (`latent.probe_accuracy`, left out without it).
    Noise (ELBO and IWAE samples) comes from generators seeded by `cfg.seed`, and
    k-means and the probe use the same seed, so the same model gives the same metrics twice.
    """
    model.eval()
    device = next(model.parameters()).device
    x = x.to(device=device, dtype=torch.float32)
    enc = encode_split(model, x, cfg.batch_size, cfg.seed)
    nll = -iwae_bound(model, x, cfg.iwae_samples, cfg.batch_size, cfg.seed).mean().item()
    metrics = {
        "test.elbo": enc.elbo,
        "test.nll_iwae": nll,
        "test.recon_mse": enc.recon_mse,
        "test.recon_bce": enc.recon_bce,
        "test.kl": enc.kl,
        "test.active_units": float(active_units(enc.mu)),
    }
    labelled = labels >= 0  # recorded traffic in the test split carries no label (-1): clustered without it
    metrics.update(cluster_scores(enc.mu[labelled.cpu()], labels[labelled], cfg.n_clusters, cfg.seed))
    if train is not None:
        x_train, y_train = train
        known = y_train >= 0
        mu_train = latent_means(model, x_train[known.to(x_train.device)].to(device, torch.float32), cfg.batch_size)
        metrics["latent.probe_accuracy"] = linear_probe(
            mu_train, y_train[known], enc.mu[labelled.cpu()], labels[labelled], cfg.seed
        )
    if model.prior.n_components:
        clusters = mixture_clusters(model, x[labelled.to(device)], cfg.batch_size)
        metrics.update(mixture_scores(clusters, labels[labelled]))
    return metrics


@torch.no_grad()
def latent_means(model: VAE, x: Tensor, batch_size: int) -> Tensor:
    """mu(x) (N, L) on the CPU, in batches."""
    return torch.cat([model.encode(xb)[0].cpu() for xb in x.split(batch_size)])


@torch.no_grad()
def mixture_clusters(model: VAE, x: Tensor, batch_size: int) -> Tensor:
    """argmax_c q(c|x) (N,) on the CPU: the cluster a mixture-prior model assigns each image."""
    return torch.cat([model.cluster_probs(xb).argmax(-1).cpu() for xb in x.split(batch_size)])


@torch.no_grad()
def encode_split(model: VAE, x: Tensor, batch_size: int, seed: int) -> Encoded:
    """Posterior means, single-sample ELBO, reconstruction errors (z = mu) and KL, in batches."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    mus, sums = [], torch.zeros(4, dtype=torch.float64, device=x.device)
    for xb in x.split(batch_size):
        mu, log_std = model.encode(xb)
        logits = model.decode_logits(mu)  # (B, D)
        bce = F.binary_cross_entropy_with_logits(logits, xb, reduction="none").sum(-1)
        se = (model.likelihood.mean(logits) - xb).pow(2).mean(-1)  # the decoded image: E[x|z = mu]
        kl = model.prior.kl(mu, log_std, mu)  # a mixture's q(c|x) at z = mu, as its clusters are
        per_image = torch.stack([elbo(model, xb, gen), se, bce, kl])  # (4, B)
        sums += per_image.double().sum(-1)
        mus.append(mu.cpu())
    means = (sums / len(x)).tolist()
    return Encoded(torch.cat(mus), *means)


@torch.no_grad()
def iwae_bound(
    model: VAE, x: Tensor, k: int, batch_size: int, seed: int, mm_dtype: torch.dtype | None = None
) -> Tensor:
    """IWAE log-likelihood bound per image (N,), `batch_size` images at a time, seeded noise.

    `mm_dtype` (e.g. bfloat16) decodes in that dtype: the bench measures its speed and its gap.
    """
    gen = torch.Generator(device=x.device).manual_seed(seed)
    batches = x.split(batch_size)
    marks = {math.ceil(len(batches) * q / 4) for q in (1, 2, 3, 4)}  # a line at each quarter: k=1000 takes minutes
    out, start = [], time.perf_counter()
    for i, xb in enumerate(batches, 1):
        out.append(iwae_log_likelihood(model, xb, k, gen, mm_dtype=mm_dtype))
        if i in marks:
            done = min(i * batch_size, len(x))
            log.info("IWAE k=%d: %s", k, eta_note(done, len(x), time.perf_counter() - start, "images"))
    return torch.cat(out).cpu()


def active_units(mu: Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> int:
    """Latent dims whose posterior mean varies across images: Var_x(E[z|x]) > threshold (Burda et al. 2016)."""
    return int((mu.double().var(dim=0) > threshold).sum())


# ---------------------------------------------------------------- latent clustering


def cluster_scores(mu: Tensor, labels: Tensor, n_clusters: int, seed: int) -> dict[str, float]:
    """k-means (seeded) on the latent means, scored against the labels: NMI, ARI, accuracy, silhouette."""
    points = mu.detach().cpu().double().numpy()
    truth = labels.detach().cpu().numpy()
    pred = KMeans(n_clusters=n_clusters, n_init=KMEANS_N_INIT, random_state=seed).fit_predict(points)
    return {
        "latent.nmi": float(normalized_mutual_info_score(truth, pred)),
        "latent.ari": float(adjusted_rand_score(truth, pred)),
        "latent.accuracy": cluster_accuracy(pred, truth),
        "latent.silhouette": silhouette(points, pred, seed),
    }


def mixture_scores(pred: Tensor, labels: Tensor) -> dict[str, float]:
    """The mixture's own clusters (argmax q(c|x)) scored against the labels: NMI, ARI, Hungarian accuracy."""
    pred_np, truth = pred.cpu().numpy(), labels.detach().cpu().numpy()
    return {
        "latent.mixture_nmi": float(normalized_mutual_info_score(truth, pred_np)),
        "latent.mixture_ari": float(adjusted_rand_score(truth, pred_np)),
        "latent.mixture_accuracy": cluster_accuracy(pred_np, truth),
    }


def linear_probe(mu_train: Tensor, y_train: Tensor, mu_test: Tensor, y_test: Tensor, seed: int) -> float:
    """Test accuracy of a logistic regression on standardised latent means: how linearly they hold the labels."""
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=PROBE_MAX_ITER, random_state=seed))
    probe.fit(mu_train.detach().cpu().double().numpy(), y_train.detach().cpu().numpy())
    return float(probe.score(mu_test.detach().cpu().double().numpy(), y_test.detach().cpu().numpy()))


def cluster_accuracy(pred: np.ndarray, truth: np.ndarray) -> float:
    """Share of points labelled right under the best one-to-one cluster-to-label map (Hungarian).

    With more clusters than labels, the clusters left without a label count as wrong.
    """
    pred_ids, pred_idx = np.unique(pred, return_inverse=True)
    true_ids, true_idx = np.unique(truth, return_inverse=True)
    counts = np.zeros((len(pred_ids), len(true_ids)), dtype=np.int64)
    np.add.at(counts, (pred_idx, true_idx), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum() / len(pred))


def silhouette(points: np.ndarray, pred: np.ndarray, seed: int) -> float:
    """Mean silhouette on at most `SILHOUETTE_SAMPLE` points; 0.0 when k-means found one cluster.

    A single cluster has no silhouette; 0.0 ("no structure") keeps the metric finite
    for a collapsed latent space instead of failing the whole evaluation.
    """
    if len(np.unique(pred)) < 2:
        return 0.0
    size = min(len(points), SILHOUETTE_SAMPLE)
    return float(silhouette_score(points, pred, sample_size=size, random_state=seed))


# ---------------------------------------------------------------- validation


def _finite(s: pd.Series) -> pd.Series:
    return pd.Series(np.isfinite(s.to_numpy(dtype=float)), index=s.index)


def _column(*checks: pa.Check, required: bool = True) -> pa.Column:
    return pa.Column(float, [pa.Check(_finite, error="finite"), *checks], nullable=False, required=required)


def _iwae_within_elbo(df: pd.DataFrame) -> pd.Series:
    return df["test.nll_iwae"] <= -df["test.elbo"] + IWAE_TOLERANCE


def _range_checks(m: Metric) -> list[pa.Check]:
    """The catalogue's valid range (less its rounding slack) and integrality as pandera checks."""
    low = m.low - m.slack
    checks = []
    if low > -INF:
        checks.append(pa.Check.in_range(low, m.high) if m.high < INF else pa.Check.ge(low))
    elif m.high < INF:
        checks.append(pa.Check.le(m.high))
    if m.integer:
        checks.append(pa.Check(lambda s: s == s.round(), error="integer-valued"))
    return checks


def metrics_schema(latent_dim: int | None = None) -> pa.DataFrameSchema:
    """The pandera schema of a one-row metrics table, from the catalogue; `latent_dim` bounds `test.active_units`."""
    bounds = {key: _range_checks(m) for key, m in CATALOGUE.items()}
    if latent_dim is not None:
        bounds["test.active_units"].append(pa.Check.le(latent_dim))
    return pa.DataFrameSchema(
        {key: _column(*checks, required=not CATALOGUE[key].mixture_only) for key, checks in bounds.items()},
        checks=[
            pa.Check(
                _iwae_within_elbo,
                error=f"test.nll_iwae <= -test.elbo + {IWAE_TOLERANCE} (the IWAE bound is at least the ELBO)",
            )
        ],
        strict=False,  # a stage may add its own keys (timings); they must still be finite numbers
    )


def validate_metrics(metrics: dict, latent_dim: int | None = None) -> None:
    """Raise `MetricsError`, naming each offending key, unless `metrics` are fit to register."""
    problems = [f"{key}: missing" for key in METRIC_KEYS if key not in metrics]
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{key}: must be a number, got {type(value).__name__} ({value!r})")
        elif not math.isfinite(value):
            problems.append(f"{key}: must be finite, got {value!r}")
    if problems:
        raise MetricsError(problems)
    table = pd.DataFrame([{k: float(v) for k, v in metrics.items()}])
    try:
        metrics_schema(latent_dim).validate(table, lazy=True)
    except pa.errors.SchemaErrors as exc:
        raise MetricsError(_describe(exc.failure_cases, metrics)) from None


def _describe(failures: pd.DataFrame, metrics: dict) -> list[str]:
    problems = []
    for row in failures.itertuples(index=False):
        if row.schema_context == "DataFrameSchema":  # the cross-key check: one line, both values
            got = f"{metrics['test.nll_iwae']!r} with test.elbo = {metrics['test.elbo']!r}"
            problems.append(f"test.nll_iwae: fails {row.check}, got {got}")
        else:
            problems.append(f"{row.column}: fails {row.check}, got {metrics[row.column]!r}")
    return sorted(set(problems))


def read_metrics(path: Path) -> dict[str, float]:
    """`reports/metrics.json`: flat, keyed as in `metrics.METRIC_KEYS` (`test.elbo`, ...)."""
    if not path.is_file():
        raise MetricsError([f"{path} not found: run the evaluate stage first (`dvc repro evaluate`)"])
    return json.loads(path.read_text())
