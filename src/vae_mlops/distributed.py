"""Data-parallel training on torch.distributed: who am I, and the few collectives the loop needs.

Launched under `torchrun` (WORLD_SIZE in the environment) or with
`train.distributed: true`, the train stage joins a process group (NCCL on GPUs,
gloo on CPUs). A plain run gets `Single`, whose collectives do nothing, so the
training loop has one code path for both.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

from vae_mlops.ports import free_port

log = logging.getLogger(__name__)

TIMEOUT = datetime.timedelta(minutes=10)  # a rank that died is noticed by torchrun long before this


@dataclass(frozen=True)
class Single:
    """One process: rank 0 of a world of 1; every collective is the identity."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return False

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return t

    def broadcast_object(self, obj: Any) -> Any:
        return obj

    def barrier(self) -> None:
        pass

    def ranks_differing(self, tensors: list[torch.Tensor]) -> int:
        return 0


@dataclass(frozen=True)
class Group(Single):
    """This process's place in an initialised process group."""

    @property
    def active(self) -> bool:
        return True

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN}[op])
        return t

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (e.g. the checkpoint to resume from)."""
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        dist.barrier()

    def ranks_differing(self, tensors: list[torch.Tensor]) -> int:
        """How many ranks hold `tensors` not bitwise equal to rank 0's: DDP's replicas must never drift."""
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        main = flat.clone()
        dist.broadcast(main, src=0)
        differs = torch.tensor([0.0 if torch.equal(flat, main) else 1.0], device=flat.device)
        dist.all_reduce(differs)
        return int(differs.item())


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def wanted(distributed: bool) -> bool:
    """DDP when asked for in params, or whenever torchrun started this process."""
    return distributed or launched_by_torchrun()


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


@contextlib.contextmanager
def session(distributed: bool, device_type: str) -> Iterator[Single]:
    """Join (and afterwards leave) a process group when DDP is wanted; else yield `Single()`.

    Without torchrun, `train.distributed: true` runs a world of one on a local
    rendezvous: the same DDP code path, handy for a first check. A group that the
    caller already initialised is used and left open.
    """
    if not wanted(distributed):
        yield Single()
        return
    own = not dist.is_initialized()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_type == "cuda":  # before the group exists, so NCCL's communicator uses this rank's GPU, not GPU 0
        torch.cuda.set_device(local_rank)
    if own and launched_by_torchrun():
        dist.init_process_group(backend_for(torch.device(device_type)), timeout=TIMEOUT)
    elif own:
        init = f"tcp://127.0.0.1:{free_port()}"
        dist.init_process_group(backend_for(torch.device(device_type)), init, timeout=TIMEOUT, rank=0, world_size=1)
    group = Group(dist.get_rank(), dist.get_world_size(), local_rank)
    log.info("DDP rank %d of %d (%s)", group.rank, group.world_size, dist.get_backend())
    try:
        yield group
    finally:
        if own:
            dist.destroy_process_group()


def device_for(device: torch.device, world: Single) -> torch.device:
    """Under DDP on GPUs each rank drives the GPU of its local rank."""
    if device.type == "cuda" and world.active:
        torch.cuda.set_device(world.local_rank)
        return torch.device("cuda", world.local_rank)
    return device


def torchrun_argv(nproc: int, argv: list[str]) -> list[str]:
    """`torchrun --standalone --nproc_per_node=nproc -m vae_mlops *argv`, with this interpreter's torch."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "vae_mlops", *argv]  # fmt: skip


def exec_torchrun(nproc: int, argv: list[str]) -> None:
    """Replace this process with torchrun running `python -m vae_mlops *argv` on `nproc` ranks.

    `train.nproc > 1` in params: `dvc repro`, `dvc exp run -S train.nproc=2` and a plain
    `python -m vae_mlops train` all start DDP this way, and DVC waits on the same process id
    and records torchrun's exit code. Never returns.
    """
    log.info("train.nproc is %d: relaunching under torchrun", nproc)
    cmd = torchrun_argv(nproc, argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)
