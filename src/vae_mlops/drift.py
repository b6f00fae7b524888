"""Is a window of served images still like the validation split? Two two-sample tests, thresholds from the reference.

The reference is what the served version gave its own validation split when it was
registered (`Reference`: per-image ELBO and latent mean, scored as the server scores
traffic). A window of `window` served images is compared with a fixed comparison
subset of it by two tests:

- the two-sample Kolmogorov-Smirnov statistic of the ELBO (as `scipy.stats.ks_2samp`,
  computed against the sorted comparison set once sorted): the VAE as its own
  novelty score, one number per image;
- the unbiased squared MMD of the latent means with an RBF kernel (Gretton et al.
  2012, eq. 3; bandwidth by the median heuristic on the comparison set): a change
  of what the images are, even where their ELBO is no worse.

Thresholds are calibrated on the reference itself, not read from asymptotics: the
comparison set and `window` more reference images are split at random, again and
again, into a window and a comparison set of the live sizes (a permutation null;
every split is a window the served version's own data could have produced). Each
test's threshold is the `1 - rate/2` quantile of its statistic over those splits,
so by Bonferroni the two together flag an in-distribution window with probability
at most `rate` per check. The rate the pair shows on the calibration splits is
reported beside it. (Windows drawn from a fixed pool and compared with a fixed
comparison set were tried first: their MMD threshold moved with the pool's own
sampling noise, by a quarter between seeds, and let through twice the rate.)

Pure maths (numpy, scipy): no MLflow, no Prefect, no database.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.spatial.distance import cdist, pdist
from scipy.stats import ks_2samp

from vae_mlops import atomic
from vae_mlops.errors import VaeMlopsError

REFERENCE_ARTIFACT = "reference/reference.npz"  # in the registered version's MLflow run
MAX_COMPARE = 1000  # comparison images at most (the MMD's cost grows with window x this)
MEDIAN_SAMPLE = 1000  # images for the median heuristic's pairwise distances


class DriftError(VaeMlopsError):
    """A reference that cannot be used: missing arrays, wrong shapes, non-finite values, too few images."""


@dataclass(frozen=True)
class Reference:
    """The served version's scores of its validation split: `elbo` (n,) nats, `mu` (n, L) latent means."""

    elbo: np.ndarray
    mu: np.ndarray

    def __post_init__(self) -> None:
        problem = _reference_problem(self.elbo, self.mu)
        if problem:
            raise DriftError(f"bad reference: {problem}")

    def save(self, path: Path) -> None:
        """Plain float32 arrays in an npz (no pickles), written whole or not at all."""
        buf = io.BytesIO()
        np.savez(buf, elbo=self.elbo.astype(np.float32), mu=self.mu.astype(np.float32))
        atomic.write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: Path) -> Reference:
        try:
            with np.load(path, allow_pickle=False) as npz:
                missing = {"elbo", "mu"} - set(npz.files)
                if missing:
                    raise DriftError(f"{path}: no {', '.join(sorted(missing))} array (has {', '.join(npz.files)})")
                return cls(np.asarray(npz["elbo"]), np.asarray(npz["mu"]))
        except (OSError, ValueError) as exc:  # not an npz, or an object array (allow_pickle=False refuses it)
            raise DriftError(f"{path}: not a reference npz of plain arrays ({exc})") from None


def _reference_problem(elbo: np.ndarray, mu: np.ndarray) -> str | None:
    if elbo.ndim != 1 or mu.ndim != 2 or len(elbo) != len(mu):
        return f"expected elbo (n,) and mu (n, L) of one n; got {elbo.shape} and {mu.shape}"
    if elbo.dtype.kind != "f" or mu.dtype.kind != "f":
        return f"expected float arrays; got {elbo.dtype} and {mu.dtype}"
    if not (np.isfinite(elbo).all() and np.isfinite(mu).all()):
        return "non-finite values"
    return None


@dataclass(frozen=True)
class Calibration:
    """The comparison set and the two thresholds for windows of `window` images."""

    window: int
    false_alarm_rate: float  # asked for, per check, both tests together
    rounds: int
    seed: int
    compare_idx: np.ndarray  # reference rows the windows are compared with
    gamma: float  # RBF kernel exp(-gamma |x - y|^2)
    ks_threshold: float
    mmd_threshold: float
    calibrated_rate: float  # share of the calibration splits the deciding tests flagged (<= false_alarm_rate)
    mmd_decides: bool = True  # False: the MMD is computed and reported, the KS alone decides (at the whole rate)


@dataclass(frozen=True)
class CheckResult:
    """One window against the reference; `over`: either statistic above its threshold."""

    n: int
    ks_elbo: float
    ks_pvalue: float  # asymptotic, for reading only: the threshold is the calibrated one
    ks_threshold: float
    mmd_mu: float
    mmd_threshold: float
    elbo_mean: float
    ref_elbo_mean: float
    mmd_decides: bool = True

    @property
    def over(self) -> bool:
        return self.ks_elbo > self.ks_threshold or (self.mmd_decides and self.mmd_mu > self.mmd_threshold)

    def as_metrics(self) -> dict[str, float]:
        return {
            "ks_elbo": self.ks_elbo, "ks_threshold": self.ks_threshold, "ks_pvalue": self.ks_pvalue,
            "mmd_mu": self.mmd_mu, "mmd_threshold": self.mmd_threshold,
            "elbo_mean": self.elbo_mean, "ref_elbo_mean": self.ref_elbo_mean, "over": float(self.over),
            "mmd_over": float(self.mmd_mu > self.mmd_threshold),
        }  # fmt: skip


# ---------------------------------------------------------------- the statistics


def median_gamma(mu: np.ndarray, seed: int = 0) -> float:
    """RBF gamma = 1 / (2 median^2) of the pairwise distances (the median heuristic)."""
    rng = np.random.default_rng(seed)
    sample = mu[rng.permutation(len(mu))[:MEDIAN_SAMPLE]].astype(np.float64)
    med = float(np.median(pdist(sample)))
    if not med > 0:
        raise DriftError("the reference's latent means are all equal: no kernel bandwidth")
    return 1.0 / (2.0 * med * med)


def within_kernel_mean(x: np.ndarray, gamma: float) -> float:
    """Mean of exp(-gamma |x_i - x_j|^2) over the pairs i != j."""
    return float(np.exp(-gamma * pdist(x.astype(np.float64), "sqeuclidean")).mean())


def cross_kernel(x: np.ndarray, y: np.ndarray, gamma: float) -> np.ndarray:
    return np.exp(-gamma * cdist(x.astype(np.float64), y.astype(np.float64), "sqeuclidean"))


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, gamma: float) -> float:
    """Unbiased squared MMD between samples x (m, L) and y (n, L), RBF kernel (Gretton et al. 2012, eq. 3)."""
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"the unbiased MMD needs 2 or more samples on each side, got {len(x)} and {len(y)}")
    return within_kernel_mean(x, gamma) + within_kernel_mean(y, gamma) - 2.0 * float(cross_kernel(x, y, gamma).mean())


def ks_statistic(x: np.ndarray, y_sorted: np.ndarray) -> float:
    """Two-sample KS statistic sup |F_x - F_y| (= `scipy.stats.ks_2samp(x, y).statistic`); `y_sorted` ascending.

    Both empirical CDFs are evaluated at every point of either sample, where the supremum is reached.
    """
    xs = np.sort(x)
    points = np.concatenate([xs, y_sorted])
    fx = np.searchsorted(xs, points, side="right") / len(xs)
    fy = np.searchsorted(y_sorted, points, side="right") / len(y_sorted)
    return float(np.abs(fx - fy).max())


# ---------------------------------------------------------------- calibration and the check


def split_reference(n: int, window: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(comparison rows, `window` more rows for the calibration splits) of a reference of n images, seeded."""
    n_cmp = min(MAX_COMPARE, n - window)
    if n_cmp < window:
        raise DriftError(
            f"a reference of {n} images is too small for windows of {window}: it needs {2 * window} or more "
            "(a larger train.val_size, or a smaller monitor.window)"
        )
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[:n_cmp]), np.sort(perm[n_cmp : n_cmp + window])


def calibrate(
    ref: Reference, window: int, false_alarm_rate: float, rounds: int, seed: int, mmd_decides: bool = True
) -> Calibration:
    """Thresholds for windows of `window` images: each deciding test's `1 - rate/k` quantile over reference splits.

    k is 2 when both tests decide (Bonferroni), 1 when the KS decides alone; the MMD's
    threshold is then still its `1 - rate/2` quantile, for reading.
    """
    if not 0 < false_alarm_rate < 1:
        raise ValueError(f"false_alarm_rate must lie in (0, 1), got {false_alarm_rate}")
    if rounds * false_alarm_rate / 2 < 5:
        raise ValueError(f"{rounds} rounds leave fewer than 5 splits beyond each threshold; use more rounds")
    cmp_idx, extra_idx = split_reference(len(ref.elbo), window, seed)
    union = np.concatenate([cmp_idx, extra_idx])
    mu, elbo = ref.mu[union].astype(np.float64), ref.elbo[union].astype(np.float64)
    gamma = median_gamma(ref.mu[cmp_idx], seed)
    k = cross_kernel(mu, mu, gamma)  # (N, N), N = comparison set + window
    n, m = len(union), window
    n_cmp = n - m
    total, rows = k.sum(), k.sum(axis=1)
    rng = np.random.default_rng(seed + 1)
    ks, mmd = np.empty(rounds), np.empty(rounds)
    for r in range(rounds):
        perm = rng.permutation(n)
        w, c = perm[:m], perm[m:]
        s_ww = k[np.ix_(w, w)].sum()
        s_wc = rows[w].sum() - s_ww
        s_cc = total - 2.0 * s_wc - s_ww
        # the unbiased MMD^2 from block sums: diagonals (k(x, x) = 1) left out of the within terms
        mmd[r] = (s_ww - m) / (m * (m - 1)) + (s_cc - n_cmp) / (n_cmp * (n_cmp - 1)) - 2.0 * s_wc / (m * n_cmp)
        ks[r] = ks_statistic(elbo[w], np.sort(elbo[c]))
    q = 1.0 - false_alarm_rate / 2.0
    ks_t = float(np.quantile(ks, q if mmd_decides else 1.0 - false_alarm_rate, method="higher"))
    mmd_t = float(np.quantile(mmd, q, method="higher"))
    rate = float(np.mean((ks > ks_t) | ((mmd > mmd_t) & mmd_decides)))
    return Calibration(window, false_alarm_rate, rounds, seed, cmp_idx, gamma, ks_t, mmd_t, rate, mmd_decides)


def check(ref: Reference, cal: Calibration, elbo: np.ndarray, mu: np.ndarray) -> CheckResult:
    """One window (`elbo` (m,), `mu` (m, L), m = cal.window) against the reference's comparison set."""
    if len(elbo) != cal.window or mu.shape != (cal.window, ref.mu.shape[1]):
        raise ValueError(
            f"a window must hold {cal.window} images with {ref.mu.shape[1]} latent dims; got {elbo.shape}, {mu.shape}"
        )
    if not (np.isfinite(elbo).all() and np.isfinite(mu).all()):
        raise ValueError("non-finite ELBO or latent mean in the window")
    cmp_elbo, cmp_mu = ref.elbo[cal.compare_idx].astype(np.float64), ref.mu[cal.compare_idx]
    pvalue = float(ks_2samp(elbo.astype(np.float64), cmp_elbo, method="asymp").pvalue)
    return CheckResult(
        n=len(elbo),
        ks_elbo=ks_statistic(elbo.astype(np.float64), np.sort(cmp_elbo)),
        ks_pvalue=pvalue,
        ks_threshold=cal.ks_threshold,
        mmd_mu=mmd2_unbiased(mu, cmp_mu, cal.gamma),
        mmd_threshold=cal.mmd_threshold,
        elbo_mean=float(np.mean(elbo, dtype=np.float64)),
        ref_elbo_mean=float(np.mean(ref.elbo, dtype=np.float64)),
        mmd_decides=cal.mmd_decides,
    )


@dataclass(frozen=True)
class DriftRule:
    """`consecutive` windows in a row over a threshold make a drift."""

    consecutive: int

    def update(self, run_length: int, over: bool) -> tuple[int, bool]:
        """(the new run of windows over a threshold, whether this window completes a drift)."""
        run_length = run_length + 1 if over else 0
        return run_length, run_length >= self.consecutive
