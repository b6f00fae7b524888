"""`host_memory.keep_freed_memory`: training steps stop faulting in fresh pages, and results do not change."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys

import pytest

from tests.support.project import ROOT

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc thresholds"
)

# Blocks of 1 MiB, 64 MiB in all, allocated, written and freed ten times: what a training step does with its
# activations and gradients, without the noise of a real step. glibc's thresholds start at their initial values,
# pinned (GLIBC_TUNABLES), so that glibc does not raise them by itself after the first frees as it may: every
# 1 MiB block is then a fresh mmap, and every round faults every page in again, unless the process raised them.
ROUNDS = """
import json, resource, sys, torch
from vae_mlops import host_memory
kept = host_memory.keep_freed_memory() if sys.argv[1] == "keep" else None
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones(1 << 18) for _ in range(64)]
    del blocks
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "faults": faults}))
"""

# Four epochs of the training loop (`train_epoch`, params.yaml's step) on random images: a checksum of the weights.
TRAINING = """
import json, sys, torch
from pathlib import Path
from vae_mlops import host_memory
from vae_mlops.distributed import Single
from vae_mlops.params import load_params
from vae_mlops.step import build_stepper
from vae_mlops.train import build_state, train_epoch
kept = host_memory.keep_freed_memory() if sys.argv[1] == "keep" else None
params = load_params(Path("params.yaml"), {"train.device": "cpu", "train.batch_size": 128})
x = torch.rand((2048, 784), generator=torch.Generator().manual_seed(1))
state = build_state(params, torch.device("cpu"))
stepper = build_stepper(state.model, state.optimizer, params.train, Single())
for epoch in range(4):
    train_epoch(state, x, params.train, state.model.config.likelihood, 4, stepper).tolist()
    state.epoch += 1
sums = sum(p.double().sum().item() for p in state.model.parameters())
print(json.dumps({"kept": kept, "sum": sums}))
"""


INITIAL_THRESHOLDS = "glibc.malloc.mmap_threshold=131072:glibc.malloc.trim_threshold=131072"


def run_child(code: str, mode: str, tunables: str = "") -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLIBC_TUNABLES": tunables}
    out = subprocess.run([sys.executable, "-c", code, mode], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True, timeout=120)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_memory_is_reused_instead_of_faulted_in_again():
    default = run_child(ROUNDS, "default", INITIAL_THRESHOLDS)
    kept = run_child(ROUNDS, "keep", INITIAL_THRESHOLDS)
    assert kept["kept"] is True
    pages = 64 * (1 << 20) // resource.getpagesize()
    assert min(default["faults"][1:]) > pages // 2, default  # the workload faults unless memory is kept
    assert sum(kept["faults"][3:]) < 64, kept  # once the heap has grown, no page is faulted in again


def test_keeping_freed_memory_changes_no_training_result():
    default, kept = run_child(TRAINING, "default"), run_child(TRAINING, "keep")
    assert kept["kept"] is True
    assert kept["sum"] == default["sum"]  # the allocator changes no result, bit for bit


def test_keep_freed_memory_is_idempotent():
    from vae_mlops.host_memory import keep_freed_memory

    assert keep_freed_memory() is True
    assert keep_freed_memory() is True
