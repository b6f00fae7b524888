"""Checkpoints that survive a kill, a full disk or a corrupt file, and carry their config.

Each checkpoint is written to a temporary file and renamed, with a `.sha256`
sidecar; loading verifies the checksum and uses `torch.load(weights_only=True)`,
so a truncated file is skipped (the previous good one is used, with a warning)
and a file holding arbitrary pickled objects is refused.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from vae_mlops import atomic
from vae_mlops.errors import VaeMlopsError
from vae_mlops.model import VAE, VAEConfig

log = logging.getLogger(__name__)

KEEP = 2  # checkpoints kept per run key: the last one and one fallback
_NAME = re.compile(r"^epoch-(\d{4,})\.pt$")
_TEMPORARY = re.compile(r"^\.epoch-\d{4,}\.pt(\.sha256)?\..+\.tmp$")  # atomic's temp names


class CheckpointError(VaeMlopsError):
    """A model file is missing, corrupt or not a checkpoint this project wrote."""


def run_key(identity: dict[str, Any]) -> str:
    """A short id for "same params, same data, same code": checkpoints resume only within it."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def save(path: Path, payload: dict[str, Any], sidecar: bool = True) -> None:
    """torch.save into memory, then write a temp file, fsync, rename; then the checksum sidecar.

    Serialising to memory first turns a full disk into a plain `OSError` on the
    file write (torch's zip writer reports it as an opaque RuntimeError), which
    `atomic` names. The final model file goes without a sidecar: DVC already records its hash.
    """
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic.write_bytes(path, buffer.getbuffer())
    if sidecar:
        atomic.write_text(_sidecar(path), atomic.sha256_file(path) + "\n")


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Verify the sidecar checksum (when present), then load tensors and plain data only."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    sidecar = _sidecar(path)
    if sidecar.is_file():
        expected = sidecar.read_text().strip()
        actual = atomic.sha256_file(path)
        if actual != expected:
            raise CheckpointError(f"{path}: checksum mismatch (sha256 {actual[:12]}…, expected {expected[:12]}…)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or unsafe file
        raise CheckpointError(f"{path}: cannot be loaded safely ({type(exc).__name__}: {exc})") from None


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def run_dir(checkpoints_dir: Path, key: str) -> Path:
    return checkpoints_dir / key


def save_epoch(checkpoints_dir: Path, key: str, epoch: int, payload: dict[str, Any]) -> Path:
    """Write `epoch-NNNN.pt` for this run key and prune all but the last `KEEP`."""
    folder = run_dir(checkpoints_dir, key)
    path = folder / f"epoch-{epoch:04d}.pt"
    save(path, payload)
    for old in _epochs(folder)[:-KEEP]:
        old.unlink(missing_ok=True)
        _sidecar(old).unlink(missing_ok=True)
    return path


def _epochs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _NAME.match(p.name)), key=lambda p: int(_NAME.match(p.name)[1]))


def remove_temporaries(folder: Path) -> list[Path]:
    """Delete the temporaries of checkpoint writes that a kill cut short; returns what was removed.

    `atomic` writes `.<name>.<random>.tmp` beside the target and renames it; a kill
    between the two leaves a full-size file that nothing would ever read or remove.
    Called at the start of a training, when no write of this run key is in progress.
    """
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if _TEMPORARY.match(p.name) and p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
        log.info("removed %s, left by a checkpoint write that did not finish", path)
    return stale


def latest_good(checkpoints_dir: Path, key: str) -> dict[str, Any] | None:
    """The newest checkpoint of this run key that loads; corrupt ones are skipped with a warning.

    Also removes the temporaries an interrupted write left (this runs once, at the start of a training).
    """
    remove_temporaries(run_dir(checkpoints_dir, key))
    for path in reversed(_epochs(run_dir(checkpoints_dir, key))):
        try:
            return load(path)
        except CheckpointError as exc:
            msg = f"skipping a bad checkpoint, falling back to the previous one: {exc}"
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            log.warning(msg)
    return None


def model_payload(model: VAE, *, params: dict, data_hash: str, history: list[dict], epoch: int) -> dict[str, Any]:
    """The final model file: enough to rebuild and evaluate the network on its own."""
    return {
        "format": 1,
        "config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "params": params,
        "data_hash": data_hash,
        "history": history,
        "epoch": epoch,
    }


def load_model(path: Path, map_location: str | torch.device = "cpu") -> tuple[VAE, dict[str, Any]]:
    """Rebuild a VAE from a model file written by `model_payload`."""
    payload = load(path, map_location)
    try:
        model = VAE(VAEConfig(**payload["config"]))
        model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a VAE model file of this project ({exc})") from None
    return model.eval(), payload
