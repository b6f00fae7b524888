"""Every test metric, once: its key, which way is better, its valid range, what it means, what it compares across.

Params validation (`register.metric`), the pandera schema of `reports/metrics.json`
(`metrics.metrics_schema`), the registry gate and the README's metrics table all
read `CATALOGUE`; `tests/test_metric_catalogue.py` keeps the README table equal to it.

A likelihood-dependent metric (`per_likelihood`) is a density, or a part of one,
under the model's own p(x|z): a Bernoulli pmf on grey values and a Gaussian density
are not numbers of one kind, so such a metric compares only models of one
`model.likelihood`; it does compare across architectures and priors (`test.elbo` and
`test.nll_iwae` bound the same log p(x) whatever the prior). The others (pixel MSE of the
decoded mean, k-means scores, the linear probe) compare across every model. The mixture's
own cluster scores (`mixture_only`) exist only for a prior with components (`model.prior:
gmm`) and compare between such models, and with the k-means scores of any model. Every
metric compares only on the same test data.

A likelihood-dependent metric also compares only between models of one `data.binarize`
(`vae_mlops.binarize`): a log-likelihood of binary pixels, the number papers report, is not
one of grey values. The registry gate never compares across either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

LOWER = "lower"
HIGHER = "higher"


@dataclass(frozen=True)
class Metric:
    key: str
    direction: str | None  # LOWER or HIGHER is better; None: no better direction, cannot drive the gate
    low: float  # valid range, inclusive; -inf/inf: unbounded
    high: float
    meaning: str
    per_likelihood: bool  # True: comparable only between models of one `model.likelihood` and one `data.binarize`
    integer: bool = False
    slack: float = 0.0  # the range check allows this much float rounding below `low`
    mixture_only: bool = False  # reported only by models whose prior has components (q(c|x))

    @property
    def lower_is_better(self) -> bool | None:
        return None if self.direction is None else self.direction == LOWER

    @property
    def comparable_across(self) -> str:
        if self.mixture_only:
            return "mixture priors"
        return "one likelihood and binarisation" if self.per_likelihood else "all likelihoods"


INF = math.inf
_CATALOGUE = (
    Metric("test.elbo", HIGHER, -INF, INF, "mean single-sample ELBO per test image in nats under the model's own "
           "likelihood (gaussian: the N(x̂, ½) that the MSE-sum implies); a log-density, so either sign", True),
    Metric("test.nll_iwae", LOWER, -INF, INF, "importance-weighted estimate of −log p(x) per test image in nats "
           "(Burda et al. 2016), k = `evaluate.iwae_samples`; ≤ −`test.elbo` up to Monte Carlo noise", True),
    Metric("test.recon_mse", LOWER, 0.0, 1.0, "mean squared error per pixel between x and the decoded z = mu", False),
    Metric("test.recon_bce", LOWER, 0.0, INF, "binary cross-entropy per test image (summed over pixels) between x "
           "and the decoded z = mu", True),
    Metric("test.kl", None, 0.0, INF, "the ELBO's KL term per test image in nats against the model's prior: "
           "KL(q(z|x) ‖ N(0, I)) in closed form, or for `gmm` VaDE's KL(q(z, c|x) ‖ p(z, c)) with q(c|x) taken "
           "at z = mu", True, slack=1e-3),
    Metric("test.active_units", None, 0.0, INF, "latent dims with Cov_x(E[z|x]) > 0.01 (Burda et al. 2016, "
           "section 5.2); at most `model.latent_dim`", False, integer=True),
    Metric("latent.nmi", HIGHER, 0.0, 1.0, "normalised mutual information of k-means clusters "
           "(k = `evaluate.n_clusters`, fixed seed) of the test `mu` against the labels", False),
    Metric("latent.ari", HIGHER, 0.0, 1.0, "adjusted Rand index of the same clusters", False),
    Metric("latent.accuracy", HIGHER, 0.0, 1.0, "share of test images labelled right by the best one-to-one "
           "cluster-to-label map (Hungarian)", False),
    Metric("latent.silhouette", HIGHER, -1.0, 1.0, "mean silhouette of the same clusters in latent space "
           "(on a seeded subsample)", False),
    Metric("latent.probe_accuracy", HIGHER, 0.0, 1.0, "linear probe: accuracy on the test images of a logistic "
           "regression trained on the training images' latent means (standardised), the standard measure of "
           "feature learning", False),
    Metric("latent.mixture_nmi", HIGHER, 0.0, 1.0, "normalised mutual information of the model's own clusters, "
           "argmax q(c|x) at z = mu, against the labels (mixture priors only)", False, mixture_only=True),
    Metric("latent.mixture_ari", HIGHER, 0.0, 1.0, "adjusted Rand index of the model's own clusters",
           False, mixture_only=True),
    Metric("latent.mixture_accuracy", HIGHER, 0.0, 1.0, "unsupervised accuracy of the model's own clusters: "
           "best one-to-one cluster-to-label map (Hungarian), as VaDE reports it", False, mixture_only=True),
)  # fmt: skip

CATALOGUE: dict[str, Metric] = {m.key: m for m in _CATALOGUE}
METRIC_KEYS: tuple[str, ...] = tuple(k for k, m in CATALOGUE.items() if not m.mixture_only)  # every model's
MIXTURE_METRIC_KEYS: tuple[str, ...] = tuple(k for k, m in CATALOGUE.items() if m.mixture_only)
GATE_METRICS: tuple[str, ...] = tuple(k for k, m in CATALOGUE.items() if m.direction is not None)


def gate_metric_problem(key: str) -> str | None:
    """Why `key` cannot be `register.metric`, or None: only catalogued metrics with a direction can."""
    if key in GATE_METRICS:
        return None  # a mixture-only key also needs a mixture prior: `params` checks the pair
    if key in CATALOGUE:
        return f"{key!r} has no better direction; use one of {', '.join(GATE_METRICS)}"
    return f"must be one of {', '.join(GATE_METRICS)}"


def _range(m: Metric) -> str:
    if m.low == -INF and m.high == INF:
        return "any"
    if m.high == INF:
        return f"≥ {m.low:g}"
    return f"[{m.low:g}, {m.high:g}]"


def markdown_table() -> str:
    """The README's metrics table (between its `metric-catalogue` markers), generated from `CATALOGUE`."""
    lines = ["| key | better | valid range | compares across | meaning |", "| --- | --- | --- | --- | --- |"]
    for m in _CATALOGUE:
        meaning = m.meaning.replace("|", "\\|")
        lines.append(f"| `{m.key}` | {m.direction or '—'} | {_range(m)} | {m.comparable_across} | {meaning} |")
    return "\n".join(lines) + "\n"
