"""The drift maths: statistics against independent computations, the stated false-alarm rate, shifts detected."""

from __future__ import annotations

import io

import numpy as np
import pytest
from scipy.stats import ks_2samp
from sklearn.metrics.pairwise import rbf_kernel

from vae_mlops import drift
from vae_mlops.drift import DriftError, DriftRule, Reference

L = 8
WINDOW = 100
RATE = 0.01


def _reference(n: int = 3000, seed: int = 0) -> Reference:
    rng = np.random.default_rng(seed)
    return Reference(rng.normal(-100, 20, n).astype(np.float32), rng.normal(0, 1, (n, L)).astype(np.float32))


@pytest.fixture(scope="module")
def calibrated() -> tuple[Reference, drift.Calibration]:
    ref = _reference()
    return ref, drift.calibrate(ref, WINDOW, RATE, rounds=2000, seed=0)


def test_ks_statistic_is_scipys():
    rng = np.random.default_rng(1)
    for m, n in ((50, 300), (200, 1000), (7, 7)):
        x, y = rng.normal(size=m), rng.normal(0.3, 1.2, size=n)
        y[:3] = x[:3]  # ties between the samples
        assert drift.ks_statistic(x, np.sort(y)) == pytest.approx(ks_2samp(x, y).statistic, abs=1e-12)


def test_mmd_is_the_unbiased_estimator_of_gretton_et_al():
    rng = np.random.default_rng(2)
    x, y, gamma = rng.normal(size=(30, 3)), rng.normal(0.5, 1, size=(40, 3)), 0.3
    kxx, kyy, kxy = rbf_kernel(x, gamma=gamma), rbf_kernel(y, gamma=gamma), rbf_kernel(x, y, gamma=gamma)
    m, n = len(x), len(y)
    want = (kxx.sum() - m) / (m * (m - 1)) + (kyy.sum() - n) / (n * (n - 1)) - 2 * kxy.mean()  # eq. 3, k(x, x) = 1
    assert drift.mmd2_unbiased(x, y, gamma) == pytest.approx(want, rel=1e-10)


def test_median_heuristic_bandwidth():
    mu = np.array([[0.0], [1.0], [3.0]])  # distances 1, 2, 3: median 2
    assert drift.median_gamma(mu) == pytest.approx(1 / (2 * 2.0**2))


def test_in_distribution_windows_raise_no_more_false_alarms_than_stated(calibrated):
    ref, cal = calibrated
    assert cal.calibrated_rate <= RATE
    rng = np.random.default_rng(3)
    trials = 1500
    alarms = sum(
        drift.check(ref, cal, rng.normal(-100, 20, WINDOW), rng.normal(0, 1, (WINDOW, L))).over for _ in range(trials)
    )
    # the rate per check, with room for the sampling noise of 1500 checks (3 sigma of a binomial at RATE)
    assert alarms / trials <= RATE + 3 * np.sqrt(RATE * (1 - RATE) / trials), f"{alarms} false alarms in {trials}"


@pytest.mark.parametrize("what", ["elbo", "mu"])
def test_shifted_windows_are_detected(calibrated, what):
    ref, cal = calibrated
    rng = np.random.default_rng(4)
    found = 0
    for _ in range(50):
        elbo, mu = rng.normal(-100, 20, WINDOW), rng.normal(0, 1, (WINDOW, L))
        if what == "elbo":
            elbo -= 20  # one standard deviation worse: images the model finds unlikely
        else:
            mu[:, 0] += 1.0  # a different kind of image with an ELBO as good
        found += drift.check(ref, cal, elbo, mu).over
    assert found == 50


def test_reference_round_trips_as_plain_arrays_and_refuses_pickles(tmp_path):
    ref = _reference(50)
    ref.save(tmp_path / "ref.npz")
    back = Reference.load(tmp_path / "ref.npz")
    np.testing.assert_array_equal(back.elbo, ref.elbo)
    np.testing.assert_array_equal(back.mu, ref.mu)

    buf = io.BytesIO()
    np.savez(buf, elbo=np.array([object()] * 3, dtype=object), mu=np.zeros((3, 2), np.float32))
    (tmp_path / "pickled.npz").write_bytes(buf.getvalue())
    with pytest.raises(DriftError, match="not a reference npz of plain arrays"):
        Reference.load(tmp_path / "pickled.npz")
    np.savez(tmp_path / "half.npz", elbo=ref.elbo)
    with pytest.raises(DriftError, match="no mu array"):
        Reference.load(tmp_path / "half.npz")
    with pytest.raises(DriftError, match="non-finite"):
        Reference(np.array([1.0, np.nan], np.float32), np.zeros((2, 2), np.float32))


def test_a_reference_too_small_for_the_window_is_a_clear_error():
    with pytest.raises(DriftError, match="too small for windows of 100"):
        drift.calibrate(_reference(150), WINDOW, RATE, rounds=2000, seed=0)


def test_drift_needs_consecutive_windows_over_a_threshold():
    rule, run = DriftRule(consecutive=2), 0
    flags = []
    for over in (True, False, True, True, True, False):
        run, is_drift = rule.update(run, over)
        flags.append(is_drift)
    assert flags == [False, False, False, True, True, False]


def test_an_mmd_that_does_not_decide_is_reported_but_raises_no_alarm():
    ref = _reference()
    cal = drift.calibrate(ref, WINDOW, RATE, rounds=1000, seed=0, mmd_decides=False)
    assert cal.ks_threshold <= drift.calibrate(ref, WINDOW, RATE, rounds=1000, seed=0).ks_threshold  # the KS gets the whole rate
    rng = np.random.default_rng(5)
    mu = rng.normal(0, 1, (WINDOW, L))
    mu[:, 0] += 1.0  # new images, as likely as the reference's
    result = drift.check(ref, cal, rng.normal(-100, 20, WINDOW), mu)
    assert result.mmd_mu > result.mmd_threshold and result.as_metrics()["mmd_over"] == 1.0 and not result.over
