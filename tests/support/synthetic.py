"""Tiny synthetic IDX datasets made by the tests: nothing is downloaded from outside."""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import yaml

NAMES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}


def idx_bytes(array: np.ndarray) -> bytes:
    """LeCun's IDX format: 0x0000, dtype 0x08 (ubyte), ndim, big-endian dims, data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Ten fixed stroke-like templates plus noise: structure a small VAE can learn."""
    templates = np.random.default_rng(1234).random((10, 28, 28)) ** 6  # sparse bright strokes
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    imgs = templates[labels] + 0.05 * rng.random((n, 28, 28))
    return (np.clip(imgs, 0, 1) * 255).astype(np.uint8), labels.astype(np.uint8)


def make_dataset(folder: Path, name: str = "tiny", n_train: int = 600, n_test: int = 200, gz: bool = True) -> dict:
    """Write the four files into `folder` (a mirror) and return the dataset spec for them."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        arrays[(split, "images")], arrays[(split, "labels")] = digits(n, seed)
    files = []
    for (split, kind), fname in NAMES.items():
        raw = idx_bytes(arrays[(split, kind)])
        if gz:
            (folder / f"{fname}.gz").write_bytes(gzip.compress(raw, mtime=0))
        else:
            (folder / fname).write_bytes(raw)
        files.append(
            {
                "name": fname,
                "split": split,
                "kind": kind,
                "count": len(arrays[(split, kind)]),
                "sha256": hashlib.sha256(raw).hexdigest(),
            }
        )
    return {name: {"files": files, "mirrors": []}}


def register(specs: dict, path: Path) -> Path:
    """Write a VAE_EXTRA_DATASETS file for the given specs."""
    path.write_text(yaml.safe_dump(specs))
    return path
