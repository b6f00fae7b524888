"""What `profile_step` and `step_floor` share: their options and the CPU training step they build from them."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from vae_mlops import host_memory
from vae_mlops.distributed import Single
from vae_mlops.params import TrainParams, load_params
from vae_mlops.step import Stepper, build_stepper
from vae_mlops.train import TrainState, build_state


def add_step_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", default="auto", help="train.precision: auto | float32 | bf16")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--params", type=Path, default=Path("params.yaml"))


def build_cpu_step(args: argparse.Namespace) -> tuple[TrainParams, TrainState, Stepper]:
    """params.yaml's step at the PyTorch example's batch 128 and lr 1e-3, on the CPU, as the train stage runs it."""
    if args.threads:
        torch.set_num_threads(args.threads)
    host_memory.keep_freed_memory()  # as the train stage does
    params = load_params(args.params, {"train.batch_size": 128, "train.lr": 1e-3, "train.precision": args.precision})
    cfg = dataclasses.replace(params.train, device="cpu", cuda_graphs=False, compile=False)
    state = build_state(dataclasses.replace(params, train=cfg), torch.device("cpu"))
    return cfg, state, build_stepper(state.model, state.optimizer, cfg, Single())
