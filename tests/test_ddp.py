"""Data-parallel training: two torchrun ranks on the CPU (gloo) on tiny data, launched as users launch it.

One uninterrupted `make train-ddp NPROC=2` run (`dvc exp run -S train.nproc=2 train`: the stage's command
relaunches itself under torchrun) is the reference: its ranks must agree, DVC must record it, it must match one
process with the same global batch, and a SIGKILLed run resumed from its checkpoint must end where it ended.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from tests.support.e2e import copy_project, dvc, tool_env
from tests.support.mlflow_store import free_port, fresh_store
from tests.support.project import ROOT, tiny_raw_params
from vae_mlops import checkpoint
from vae_mlops.params import ParamsError, parse_params
from vae_mlops.paths import Paths
from vae_mlops.stages.train import train as run_train
from vae_mlops.train import shard_plan

EPOCHS = 30
# 499 training images: global batches of 64 leave a last one of 51, split 26 / 25 between the ranks.
DDP = {"train.batch_size": 32, "train.val_size": 101, "train.epochs": EPOCHS, "train.image_every": EPOCHS}
TRAIN = [sys.executable, "-m", "vae_mlops", "train"]  # with train.nproc: 2 in params.yaml: torchrun, 2 ranks


def weights(root: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load_model(Paths(root).model_file)[0].state_dict()


def checkpoints(root: Path) -> list[Path]:
    return sorted(Paths(root).checkpoints_dir.rglob("epoch-*.pt"))


def env(mirror: Path) -> dict[str, str]:
    return tool_env(VAE_DATA_MIRROR=str(mirror), OMP_NUM_THREADS="1")


def ddp_project(dest: Path, reference: Path) -> Path:
    """A project holding the reference's params and downloaded data, and an empty MLflow store."""
    shutil.copytree(reference / "data", dest / "data")
    shutil.copy2(reference / "params.yaml", dest / "params.yaml")
    fresh_store(dest)
    return dest


@pytest.fixture(scope="module")
def reference(tiny_mirror, tmp_path_factory) -> tuple[Path, str]:
    """`make train-ddp NPROC=2` in a fresh git + DVC project, uninterrupted; its root and output."""
    root = copy_project(tmp_path_factory.mktemp("ddp") / "reference", **DDP)
    venv = Path(sys.executable).parents[1]
    make = ["make", "-f", str(ROOT / "Makefile"), "-o", "setup", "train-ddp", "NPROC=2", f"VENV={venv}"]
    proc = subprocess.run(make, cwd=root, env=env(tiny_mirror), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root, proc.stdout + proc.stderr


# ---------------------------------------------------------------- sharding (fast)


@pytest.mark.parametrize("n, batch_size, world_size", [(499, 32, 2), (500, 32, 2), (97, 8, 3), (5, 4, 2)])
def test_rank_shards_make_up_the_one_process_batches_with_the_global_batch(n, batch_size, world_size):
    plans = [shard_plan(n, batch_size, world_size, r) for r in range(world_size)]
    single = shard_plan(n, batch_size * world_size, 1, 0)
    assert all(p.global_sizes == single.local_sizes for p in plans)
    starts = [[0, *torch.tensor(p.local_sizes).cumsum(0).tolist()] for p in plans]
    for step in range(len(single.local_sizes)):  # step s: rank 0's block, then rank 1's, ... is the global batch
        blocks = [p.positions[s[step] : s[step + 1]] for p, s in zip(plans, starts)]
        lo = sum(single.local_sizes[:step])
        assert torch.equal(torch.cat(blocks), single.positions[lo : lo + single.local_sizes[step]])
    sizes = [p.local_sizes[-1] for p in plans]
    assert max(sizes) - min(sizes) <= 1  # the short last batch is split evenly


def test_nproc_above_one_outside_torchrun_names_the_setting(tiny_mirror, tmp_path, monkeypatch):
    """Calling the stage function in one process with train.nproc: 2 would silently train alone: refused."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ParamsError, match=r"train\.nproc is 2 .* not started by torchrun"):
        run_train(parse_params(tiny_raw_params(**{"train.nproc": 2})), Paths(tmp_path))
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- the replica check


# Two bare processes (torch and `vae_mlops.distributed` only): rank 1's second tensor is off by 1e-7.
REPLICA_CHECK = """
import sys, torch, torch.distributed as dist
from vae_mlops.distributed import Group
rank = int(sys.argv[1])
dist.init_process_group("gloo", f"tcp://127.0.0.1:{sys.argv[2]}", rank=rank, world_size=2)
group = Group(rank, 2, rank)
same = [torch.ones(3), torch.zeros(2)]
drifted = [torch.ones(3), torch.full((2,), 1e-7 if rank == 1 else 0.0)]
print(group.ranks_differing(same), group.ranks_differing(drifted))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_replica_check_catches_a_rank_whose_weights_drifted():
    port = str(free_port())
    ranks = [subprocess.Popen([sys.executable, "-c", REPLICA_CHECK, str(r), port], stdout=subprocess.PIPE, text=True)
             for r in range(2)]  # fmt: skip
    outs = [p.communicate(timeout=120)[0].split() for p in ranks]
    assert outs == [["0", "1"], ["0", "1"]]  # every rank learns it, so every rank fails, not only rank 0


# ---------------------------------------------------------------- two ranks under torchrun


@pytest.mark.slow
def test_make_train_ddp_ranks_agree_and_rank_0_alone_writes_and_logs(reference):
    root, out = reference
    assert "DDP rank 1 of 2 (gloo)" in out and "global batch 64" in out
    assert "weights identical on all 2 ranks" in out  # the stage compares every rank's weights with rank 0's
    assert [p.name for p in checkpoints(root)] == [f"epoch-{EPOCHS - 1:04d}.pt", f"epoch-{EPOCHS:04d}.pt"]
    with sqlite3.connect(root / "mlflow.db") as db:  # one run, each epoch logged once: only rank 0 logs
        assert db.execute("select count(*) from runs").fetchone() == (1,)
        assert db.execute("select count(*) from metrics where key = 'train/loss'").fetchone() == (EPOCHS,)
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["train"]  # DVC ran and recorded it
    assert lock["params"]["params.yaml"]["train"]["nproc"] == 2
    assert {o["path"] for o in lock["outs"]} >= {"models/vae.pt", "reports/mlflow_run.json"}
    assert dvc("status", "train", "--json", cwd=root).stdout.strip() == "{}"  # nothing left to rerun


@pytest.mark.slow
def test_two_ranks_match_one_process_with_the_global_batch(reference, tmp_path):
    root, _ = reference
    one = Paths(tmp_path / "one")
    shutil.copytree(root / "data", one.root / "data")
    run_train(parse_params(tiny_raw_params(**{**DDP, "train.batch_size": 64})), one)
    ddp, single = weights(root), weights(one.root)
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-4, atol=1e-5)  # sums in another order only
    ddp_history = checkpoint.load(Paths(root).model_file)["history"]
    single_history = checkpoint.load(one.model_file)["history"]
    for a, b in zip(ddp_history, single_history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers at once, as a crash of the node would (workers have their own sessions)."""
    workers = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    for w in workers:
        try:
            w.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(workers, timeout=30)


@pytest.mark.slow
def test_sigkilled_ddp_run_resumes_from_its_checkpoint_to_the_same_weights(reference, tiny_mirror, tmp_path):
    straight, _ = reference
    root = ddp_project(tmp_path / "killed", straight)
    with open(tmp_path / "killed.log", "wb") as log:
        proc = subprocess.Popen(TRAIN, cwd=root, env=env(tiny_mirror), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        try:
            while not any(p.name == "epoch-0002.pt" for p in checkpoints(root)):
                assert proc.poll() is None, (tmp_path / "killed.log").read_text()
                time.sleep(0.02)
        finally:
            _kill_tree(proc)
    assert not Paths(root).model_file.exists(), "the run finished before it was killed: raise EPOCHS"
    out = subprocess.run(TRAIN, cwd=root, env=env(tiny_mirror), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "resuming from checkpoint" in out.stderr and "weights identical on all 2 ranks" in out.stderr
    resumed, reference_weights = weights(root), weights(straight)
    assert all(torch.equal(resumed[k], reference_weights[k]) for k in reference_weights)
    assert [row["epoch"] for row in checkpoint.load(Paths(root).model_file)["history"]] == list(range(1, EPOCHS + 1))
