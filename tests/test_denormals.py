"""`denormals.flushed_denormals` around the training loop: Adam's decaying state becomes zero, not denormal."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from vae_mlops.denormals import flushed_denormals
from vae_mlops.train import build_state, train_epoch

TINY = torch.finfo(torch.float32).tiny  # the smallest normal float32, 1.2e-38
THREADS = 2  # the per-thread setting is what is tested: it needs a pool of more than one thread


@pytest.fixture
def two_threads():
    """Torch's pool at two threads for the test (conftest runs each xdist worker on one), then as it was."""
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    assert torch.get_num_threads() == THREADS
    yield
    torch.set_num_threads(before)


def denormal_count(t: torch.Tensor) -> int:
    return int(((t != 0) & (t.abs() < TINY)).sum())


def test_denormals_read_as_zero_inside_on_every_thread_and_not_after(two_threads):
    x = torch.full((1 << 22,), 1e-39)  # large enough to be split across torch's threads
    assert denormal_count(x) == x.numel()
    with flushed_denormals() as supported:
        assert supported  # x86 with SSE3: every machine this project runs on
        assert int((x * 1.0).count_nonzero()) == 0
        assert int((torch.full_like(x, 1e-30) * 1e-10).count_nonzero()) == 0  # a denormal result is flushed too
    assert denormal_count(x * 1.0) == x.numel()  # switched back off: the rest of the process sees the default


# A process that loaded scikit-learn after torch: its own libgomp is mapped first, and runs another pool.
WITH_SKLEARN = """
import torch, sklearn.cluster
print(torch.get_num_threads())
maps = [ln.split()[-1] for ln in open("/proc/self/maps") if "libgomp" in ln and "r-xp" in ln]
x = torch.full((1 << 22,), 1e-39)
from vae_mlops.denormals import flushed_denormals
with flushed_denormals():
    inside = int((x * 1.0).count_nonzero())
print(len(maps), inside, int((x * 1.0).count_nonzero()))
"""


def test_every_thread_of_torchs_pool_is_set_when_another_libgomp_is_loaded():
    # MKL_NUM_THREADS, which conftest sets to 1 under xdist, would override OMP_NUM_THREADS in torch
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}
    out = subprocess.run([sys.executable, "-c", WITH_SKLEARN], env=env, capture_output=True, text=True, check=True)
    threads, libgomps, inside, after = map(int, out.stdout.split())
    assert threads == THREADS, f"torch ran {threads} thread(s): the per-thread setting was not tested"
    assert libgomps == 2  # torch's and scikit-learn's
    assert inside == 0, f"{inside} of {1 << 22} denormals left: a thread of torch's pool kept its setting"
    assert after == 1 << 22


def test_adam_state_of_weights_without_gradient_turns_zero_not_denormal(tiny_params, two_threads):
    """Pixels that are always 0 give their fc1 weights no gradient: Adam's first moment only decays.

    Planted at 1e-37, it falls below 1.18e-38 after 21 steps at beta1 = 0.9 (0.9^21 = 0.109); the epoch has 40.
    """
    params = dataclasses.replace(tiny_params, train=dataclasses.replace(tiny_params.train, batch_size=8))
    state = build_state(params, torch.device("cpu"))
    x = torch.rand(320, 784, generator=torch.Generator().manual_seed(0))
    x[:, :50] = 0  # a border that is always black, as MNIST's
    cfg, likelihood = params.train, params.model.likelihood
    train_epoch(state, x, cfg, likelihood, 2).tolist()  # creates Adam's state
    w1 = state.model.fc1.weight
    exp_avg = state.optimizer.state[w1]["exp_avg"]
    exp_avg[:, :50] = 1e-37
    loss, *_ = train_epoch(state, x, cfg, likelihood, 2).tolist()
    assert torch.isfinite(torch.tensor(loss))
    assert int(exp_avg[:, :50].count_nonzero()) == 0
    assert all(denormal_count(s[k]) == 0 for s in state.optimizer.state.values() for k in ("exp_avg", "exp_avg_sq"))
    assert denormal_count(exp_avg[:, :50] * 1e-1 + 1e-39) > 0  # and outside the loop denormals are back
