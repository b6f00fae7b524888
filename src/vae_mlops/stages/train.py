"""The train stage: load the split onto the device, resume or start, checkpoint every epoch.

Under DDP (`torchrun`, or `train.distributed: true`) every rank runs this function:
all ranks load the data and resume from the checkpoint rank 0 found, and only rank 0
writes checkpoints, the model, the history and the pictures, and talks to the logger.
Before it writes the model, every rank's weights are checked against rank 0's.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from vae_mlops import atomic, checkpoint, data, distributed, host_memory, images, pretrain
from vae_mlops.model import VAE
from vae_mlops.params import Params, ParamsError
from vae_mlops.paths import Paths
from vae_mlops.precision import resolve_precision
from vae_mlops.stage_inputs import load_train_data
from vae_mlops.distributed import Single
from vae_mlops.train import (
    EpochStats,
    TrainState,
    build_state,
    fit,
    progress_note,
    resolve_device,
)

log = logging.getLogger(__name__)

# a change here invalidates resumable checkpoints
CODE_FILES = ("model.py", "train.py", "step.py", "pretrain.py", "binarize.py", "likelihoods/*.py", "archs/*.py", "priors/*.py")

class RunLogger(Protocol):
    """Where the train stage reports each epoch (MLflow in production, nothing in unit tests)."""

    def log_epoch(self, stats: EpochStats) -> None: ...

    def log_images(self, grids: dict[str, Tensor], step: int) -> None: ...

    def log_datasets(self, splits: dict[str, tuple[Tensor, Tensor | None]], dataset: str, data_hash: str) -> None: ...


class NullLogger:
    def log_epoch(self, stats: EpochStats) -> None:
        pass

    def log_images(self, grids: dict[str, Tensor], step: int) -> None:
        pass

    def log_datasets(self, splits: dict[str, tuple[Tensor, Tensor | None]], dataset: str, data_hash: str) -> None:
        pass


def code_hash() -> str:
    here = Path(__file__).parents[1]
    files = [f for pattern in CODE_FILES for f in sorted(here.glob(pattern))]
    return atomic.sha256_bytes(b"".join(f.read_bytes() for f in files))


NOT_IN_KEY = ("epochs", "image_every", "device", "threads", "distributed", "nproc")  # change no result


def checkpoint_key(params: Params, data_hash: str, device: torch.device, world_size: int = 1) -> str:
    """Same model, training params (but epochs and image cadence), data, device, world size and code.

    The world size is in the key because the global batch is `batch_size * world_size`.
    """
    train = {k: v for k, v in asdict(params.train).items() if k not in NOT_IN_KEY}
    train["precision"] = resolve_precision(params.train.precision, device)  # `auto` differs between machines
    identity = {
        "model": asdict(params.model),
        "train": train,
        "device": device.type,
        "world_size": world_size,
        "data_hash": data_hash,
        "binarize": params.data.binarize,  # the same data, drawn binary or not, trains another model
        "code": code_hash(),
    }
    return checkpoint.run_key(identity)


def restore(state: TrainState, ckpt: dict) -> None:
    state.model.load_state_dict(ckpt["model"])  # (copies onto the model's device)
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.noise.set_state(ckpt["noise_rng"].cpu() if state.noise.device.type == "cpu" else ckpt["noise_rng"])
    state.epoch = int(ckpt["epoch"])
    state.history = list(ckpt["history"])


def checkpoint_payload(state: TrainState, params: Params, data_hash: str) -> dict:
    return {
        "format": 1,
        "epoch": state.epoch,
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "noise_rng": state.noise.get_state(),
        "history": state.history,
        "config": state.model.config.to_dict(),
        "params": params.to_dict(),
        "data_hash": data_hash,
    }


def write_history(path: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(EpochStats.__dataclass_fields__), lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic.write_text(path, buf.getvalue())


def write_grids(model: VAE, x_val: Tensor, paths: Paths, seed: int) -> dict[str, Tensor]:
    grids = {"samples": images.sample_grid(model, seed=seed), "reconstructions": images.reconstruction_grid(model, x_val)}
    for name, grid in grids.items():
        images.save_png(grid, paths.train_images_dir / f"{name}.png")
    return grids


def train(params: Params, paths: Paths, logger: RunLogger | None = None) -> dict:
    """Train the VAE, resuming from a checkpoint of the same run key; write `models/vae.pt`.

    Joins a DDP process group when launched under torchrun or with `train.distributed: true`.
    """
    cfg = params.train
    if cfg.nproc > 1 and not distributed.launched_by_torchrun():
        raise ParamsError([f"train.nproc is {cfg.nproc} but this process was not started by torchrun: run it with "
                           "`python -m vae_mlops train` or `dvc repro`, which launch torchrun, or set train.nproc: 1"])
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    host_memory.keep_freed_memory()
    device = resolve_device(cfg.device)
    with distributed.session(cfg.distributed, device.type) as world:
        return _train(params, paths, logger if world.is_main else None, distributed.device_for(device, world), world)


class ReplicasDiverged(RuntimeError):
    """Under DDP the ranks ended with different weights: a bug in the data-parallel step, never a user fault."""


def _check_same_data(data_hash: str, world: Single, device: torch.device) -> None:
    """Every rank raises (none waits in a collective) when some rank holds other data than rank 0."""
    other = torch.tensor([float(world.broadcast_object(data_hash) != data_hash)], device=device)
    if world.all_reduce(other).item():
        raise data.DataError(
            f"{int(other.item())} of {world.world_size} ranks hold other data than rank 0 "
            f"(this is rank {world.rank}, data hash {data_hash[:12]}…): `dvc pull` the same data on every node"
        )


def _check_replicas(state: TrainState, world: Single) -> None:
    """Before rank 0 writes the model: every rank must hold rank 0's weights, bit for bit."""
    differing = world.ranks_differing(list(state.model.parameters()))
    if differing:
        raise ReplicasDiverged(
            f"after training, {differing} of {world.world_size} DDP ranks hold weights that differ from rank 0's; "
            "the model file was not written"
        )
    if world.active and world.is_main:
        log.info("weights identical on all %d ranks", world.world_size)


def _resume_point(paths: Paths, key: str, world: Single) -> dict | None:
    """Rank 0 picks the newest good checkpoint; every rank resumes from that one."""
    ckpt = checkpoint.latest_good(paths.checkpoints_dir, key) if world.is_main else None
    return world.broadcast_object(ckpt)


def _train(params: Params, paths: Paths, logger: RunLogger | None, device: torch.device, world: Single) -> dict:
    logger = logger or NullLogger()
    cfg = params.train
    td = load_train_data(params, paths, device)
    data_hash = td.manifest["data_hash"]
    _check_same_data(data_hash, world, device)
    key = checkpoint_key(params, data_hash, device, world.world_size)
    state = build_state(params, device)
    ckpt = _resume_point(paths, key, world)
    if ckpt is not None:
        restore(state, ckpt)
        log.info("resuming from checkpoint %s epoch %d", key, state.epoch)
        for row in state.history:  # a new run (or a rerun after a tracking fault) still gets every epoch
            logger.log_epoch(EpochStats(**row))
    else:  # a fresh start: the autoencoder pretraining and the prior's fit, when `train.pretrain_epochs` asks
        pretrain.initialise(state.model, td.x_train, cfg)

    clock = {"first": state.epoch, "seconds": 0.0}  # this process's epochs, for the time left

    def on_epoch(stats: EpochStats, st: TrainState) -> None:
        if not world.is_main:
            return
        clock["seconds"] += stats.seconds
        checkpoint.save_epoch(paths.checkpoints_dir, key, st.epoch, checkpoint_payload(st, params, data_hash))
        write_history(paths.history_file, st.history)
        if st.epoch % cfg.image_every == 0 or st.epoch == cfg.epochs:
            logger.log_images(write_grids(st.model, td.x_val, paths, cfg.seed), st.epoch)
        logger.log_epoch(stats)
        log.info(
            "%s  train %.2f (recon %.2f, kl %.2f)  val %.2f  %.2fs",
            progress_note(stats.epoch, cfg.epochs, stats.epoch - clock["first"], clock["seconds"]),
            stats.train_loss, stats.train_recon, stats.train_kl, stats.val_loss, stats.seconds,
        )  # fmt: skip

    if world.is_main:
        splits = {"train": (td.x_train, None), "validation": (td.x_val, None)}
        logger.log_datasets(splits, params.data.dataset, data_hash)
        log.info(
            "training on %s x %d: %d train, %d val images, global batch %d, run key %s",
            device.type, world.world_size, len(td.x_train), len(td.x_val), cfg.batch_size * world.world_size, key,
        )  # fmt: skip
    resumed_at = state.epoch
    history = fit(state, td.x_train, td.x_val, cfg, params.model.likelihood, on_epoch, world, params.data.binarize)
    _check_replicas(state, world)
    if world.is_main:
        if not paths.history_file.exists() or ckpt is not None:
            write_history(paths.history_file, history)
            grids = write_grids(state.model, td.x_val, paths, cfg.seed)
            if resumed_at == state.epoch:  # nothing left to train: the new run still gets the final pictures
                logger.log_images(grids, state.epoch)
        payload = checkpoint.model_payload(
            state.model, params=params.to_dict(), data_hash=data_hash, history=history, epoch=state.epoch
        )
        checkpoint.save(paths.model_file, payload, sidecar=False)
    world.barrier()  # every rank returns once the model file exists
    final = history[-1]
    return {
        "epochs": state.epoch,
        "val_loss": final["val_loss"],
        "device": str(device),
        "data_hash": data_hash,
        "world_size": world.world_size,
    }
