"""NaN at a later epoch, under the same checkpoint key: the good epochs stay, and the rerun resumes from them.

The fault is outside everything the run key holds (params, data, code): a `sitecustomize` that the test puts
on PYTHONPATH corrupts one weight with NaN after a given training step (`Stepper`, whichever path the step
takes: autograd and `optimizer.step()`, or the fused kernels), as failing memory or a bad kernel would.
The stage itself is what a user runs, `python -m vae_mlops train`; removing the fault (no PYTHONPATH) and
rerunning must resume from the last good epoch and end with the weights of a run that never failed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.support.e2e import copy_project, tool_env
from vae_mlops import checkpoint
from vae_mlops.params import parse_params
from vae_mlops.paths import Paths
from vae_mlops.stages.train import train as run_train

pytestmark = pytest.mark.slow

EPOCHS = 4
STEPS_PER_EPOCH = 8  # tiny data: 600 - 100 held out = 500 images in batches of 64
NAN_AFTER_STEP = 2 * STEPS_PER_EPOCH + 3  # the 4th batch of epoch 3 sees NaN weights

HOOK = '''
import os
import torch
from vae_mlops import step as step_module

_after = int(os.environ["VAE_TEST_NAN_AFTER_STEP"])
_steps = [0]
_call = step_module.Stepper.__call__


def call(self, *args, **kwargs):
    out = _call(self, *args, **kwargs)
    _steps[0] += 1
    if _steps[0] == _after:
        with torch.no_grad():
            self.optimizer.param_groups[0]["params"][0].view(-1)[0] = float("nan")
    return out


step_module.Stepper.__call__ = call
'''


def train(repo: Path, mirror: Path, hook: Path | None = None) -> subprocess.CompletedProcess:
    env = {"VAE_DATA_MIRROR": str(mirror)}
    if hook is not None:
        env |= {"PYTHONPATH": str(hook), "VAE_TEST_NAN_AFTER_STEP": str(NAN_AFTER_STEP)}
    return subprocess.run([sys.executable, "-m", "vae_mlops", "train"], cwd=repo, env=tool_env(**env),
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def checkpoints(repo: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((repo / "models" / "checkpoints").rglob("epoch-*.pt"))}


def test_nan_at_epoch_3_keeps_epochs_1_and_2_and_the_rerun_resumes_from_2(tiny_mirror, tmp_path):
    repo = copy_project(tmp_path / "repo", **{"train.epochs": EPOCHS, "train.image_every": EPOCHS})
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    download = subprocess.run([sys.executable, "-m", "vae_mlops", "download"], cwd=repo,
                              env=tool_env(VAE_DATA_MIRROR=str(tiny_mirror)), capture_output=True, text=True)  # fmt: skip
    assert download.returncode == 0, download.stderr

    failed = train(repo, tiny_mirror, hook)
    assert failed.returncode == 2, failed.stderr
    assert "Traceback" not in failed.stderr
    assert "loss became NaN/inf at epoch 3, batch 3" in failed.stderr and "train.lr" in failed.stderr
    kept = checkpoints(repo)
    assert list(kept) == ["epoch-0001.pt", "epoch-0002.pt"]  # the good epochs, under the run's one key
    assert not (repo / "models" / "vae.pt").exists()

    resumed = train(repo, tiny_mirror)  # the cause removed
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from checkpoint" in resumed.stderr and "epoch 2" in resumed.stderr
    model, meta = checkpoint.load_model(repo / "models" / "vae.pt")
    assert [row["epoch"] for row in meta["history"]] == list(range(1, EPOCHS + 1))

    straight = Paths(tmp_path / "straight")  # the same params and data, never failed
    shutil.copytree(repo / "data", straight.root / "data")
    run_train(parse_params(yaml.safe_load((repo / "params.yaml").read_text())), straight)
    reference = checkpoint.load_model(straight.model_file)[0].state_dict()
    assert all(torch.equal(t, reference[k]) for k, t in model.state_dict().items())
