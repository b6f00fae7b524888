"""`host_memory.keep_freed_memory`: training steps stop faulting in fresh pages, and results do not change."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from tests.support.project import ROOT

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc thresholds"
)

# Four epochs of the training loop (`train_epoch`, params.yaml's step) on random images: page faults per step
# in the quietest of epochs 2-4 (the kernel may fault in a burst of pages of its own, e.g. when it compacts
# memory for another process), and a checksum of the weights.
CHILD = """
import json, resource, sys, dataclasses, torch
from pathlib import Path
from vae_mlops import host_memory
from vae_mlops.distributed import Single
from vae_mlops.params import load_params
from vae_mlops.stages.train import build_state
from vae_mlops.step import build_stepper
from vae_mlops.train import train_epoch
kept = host_memory.keep_freed_memory() if sys.argv[1] == "keep" else None
params = load_params(Path("params.yaml"), {"train.device": "cpu", "train.batch_size": 128})
x = torch.rand((2048, 784), generator=torch.Generator().manual_seed(1))
state = build_state(params, torch.device("cpu"))
stepper = build_stepper(state.model, state.optimizer, params.train, Single())
faults = []
for epoch in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    train_epoch(state, x, params.train, state.model.config.likelihood, 4, stepper).tolist()
    state.epoch += 1
    faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / (len(x) // 128))
sums = sum(p.double().sum().item() for p in state.model.parameters())
print(json.dumps({"kept": kept, "faults": min(faults[1:]), "sum": sums}))
"""


def run_child(mode: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, mode], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True, timeout=120)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_training_steps_reuse_freed_memory_instead_of_faulting_in_pages():
    default, kept = run_child("default"), run_child("keep")
    assert kept["kept"] is True
    # glibc's default maps many ~1 MB blocks afresh: 150-220 faults a step on the CI machine (how many depends
    # on the heap's history, so only the kept side is asserted)
    assert kept["faults"] < 2, (default, kept)
    assert kept["sum"] == default["sum"]  # the allocator changes no result, bit for bit


def test_keep_freed_memory_is_idempotent():
    from vae_mlops.host_memory import keep_freed_memory

    assert keep_freed_memory() is True
    assert keep_freed_memory() is True
