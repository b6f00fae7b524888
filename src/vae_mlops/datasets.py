"""What each dataset is: its four IDX files, their checksums, shapes and mirrors.

The data is identified by the sha256 of each *decompressed* file, never by
where it came from. `VAE_EXTRA_DATASETS` may name a YAML file of further
datasets in the same form (tiny synthetic data for tests, or your own IDX set).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

SPLITS = ("train", "test")
KINDS = ("images", "labels")


@dataclass(frozen=True)
class IdxFile:
    """One IDX file of a dataset: which split and kind, and its expected content."""

    name: str  # e.g. "train-images-idx3-ubyte" (decompressed name)
    split: str
    kind: str
    count: int
    sha256: str


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    files: tuple[IdxFile, ...]
    mirrors: tuple[str, ...]
    rows: int = 28
    cols: int = 28
    n_classes: int = 10

    def file(self, split: str, kind: str) -> IdxFile:
        return next(f for f in self.files if f.split == split and f.kind == kind)


def _files(sha: dict[str, str], n_train: int, n_test: int) -> tuple[IdxFile, ...]:
    prefix = {"train": "train", "test": "t10k"}
    count = {"train": n_train, "test": n_test}
    dims = {"images": "idx3", "labels": "idx1"}
    return tuple(
        IdxFile(f"{prefix[s]}-{k}-{dims[k]}-ubyte", s, k, count[s], sha[f"{prefix[s]}-{k}-{dims[k]}-ubyte"])
        for s in SPLITS
        for k in KINDS
    )


BUILTIN: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        "mnist",
        _files(
            {
                "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
                "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
                "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
                "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
            },
            60_000,
            10_000,
        ),
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
    ),
    "fashion-mnist": DatasetSpec(
        "fashion-mnist",
        _files(
            {
                "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
                "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
                "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
                "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
            },
            60_000,
            10_000,
        ),
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    ),
}


def _extra() -> dict[str, DatasetSpec]:
    path = os.environ.get("VAE_EXTRA_DATASETS")
    if not path:
        return {}
    raw = yaml.safe_load(Path(path).read_text()) or {}
    out = {}
    for name, d in raw.items():
        files = tuple(IdxFile(**f) for f in d["files"])
        out[name] = DatasetSpec(name, files, tuple(d.get("mirrors", ())), d.get("rows", 28), d.get("cols", 28))
    return out


def known_datasets() -> dict[str, DatasetSpec]:
    return {**BUILTIN, **_extra()}


def get_dataset(name: str) -> DatasetSpec:
    specs = known_datasets()
    if name not in specs:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(sorted(specs))}")
    return specs[name]
