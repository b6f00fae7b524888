"""The repository under test and the tiny params every training test uses."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]

TINY_OVERRIDES = {
    "data.dataset": "tiny",
    "model.hidden_dim": 64,
    "model.latent_dim": 4,
    "train.epochs": 2,
    "train.batch_size": 64,
    "train.val_size": 100,
    "train.image_every": 1,
    "train.device": "cpu",
    "train.precision": "float32",  # the default `auto` is bf16 on some CPUs; tests compare float32 results
    "evaluate.iwae_samples": 8,
    "evaluate.batch_size": 100,
}


def tiny_raw_params(**extra) -> dict:
    """The repo's params.yaml with the tiny overrides (and `extra`, dotted keys) applied."""
    from vae_mlops.params import apply_overrides

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    return apply_overrides(raw, {**TINY_OVERRIDES, **extra})
