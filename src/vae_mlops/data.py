"""Fetch, verify and load the IDX datasets; the pandera schema of the per-image table.

Every file is checked (HTML page, gzip integrity, IDX magic, dimensions and
counts, label range, sha256 of the decompressed bytes) before anything is
written, and the dataset folder is swapped in whole, so `data/` never holds a
half-written or unverified file.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import struct
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pandera.pandas as pa
import torch

from vae_mlops import atomic
from vae_mlops.datasets import DatasetSpec, IdxFile
from vae_mlops.errors import VaeMlopsError

log = logging.getLogger(__name__)

MIRROR_ENV = "VAE_DATA_MIRROR"
OFFLINE_ENV = "VAE_OFFLINE"  # "1": use only VAE_DATA_MIRROR, never the official mirrors
IDX_UBYTE = 0x08
GZIP_MAGIC = b"\x1f\x8b"


class DataError(VaeMlopsError):
    """A dataset file could not be fetched or is not what it should be."""


@dataclass(frozen=True)
class Fetched:
    """A verified, decompressed IDX file and where it came from."""

    file: IdxFile
    content: bytes
    source: str


# ---------------------------------------------------------------- mirrors


def mirror_list(spec: DatasetSpec) -> list[str]:
    """`VAE_DATA_MIRROR` first, then the dataset's official mirrors (unless offline)."""
    mirrors = []
    env = os.environ.get(MIRROR_ENV, "").strip()
    if env:
        mirrors.append(env)
    if os.environ.get(OFFLINE_ENV, "") not in ("1", "true", "yes"):
        mirrors.extend(spec.mirrors)
    if not mirrors:
        raise DataError(f"no mirror to download {spec.name} from: {OFFLINE_ENV}=1 but {MIRROR_ENV} is not set")
    return mirrors


def _candidates(mirror: str, name: str) -> list[str]:
    """URLs or paths of a file at a mirror: gzipped first, then raw."""
    scheme = urllib.parse.urlparse(mirror).scheme
    if scheme in ("http", "https", "file"):
        base = mirror if mirror.endswith("/") else mirror + "/"
        return [base + name + ".gz", base + name]
    folder = Path(mirror).expanduser()
    return [str(folder / (name + ".gz")), str(folder / name)]


class _NotThere(Exception):
    """The mirror answered but has no such file: try the next candidate."""


def _read(location: str, timeout_s: float, retries: int) -> bytes:
    """Read a local path, file:// or http(s):// URL, retrying transient network faults."""
    parsed = urllib.parse.urlparse(location)
    if parsed.scheme in ("", "file"):
        path = Path(urllib.parse.unquote(parsed.path) if parsed.scheme else location)
        if not path.is_file():
            raise _NotThere(location)
        return path.read_bytes()
    last: Exception | None = None
    for attempt in range(retries):
        try:
            with urllib.request.urlopen(location, timeout=timeout_s) as resp:
                return resp.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise _NotThere(location) from exc
            last = exc
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
            last = exc
        if attempt + 1 < retries:
            time.sleep(min(0.5 * 2**attempt, 5.0))
    raise DataError(f"{location}: unreachable after {retries} attempt(s) ({last})")


# ---------------------------------------------------------------- verification


def decode_payload(raw: bytes, file: IdxFile, source: str) -> bytes:
    """Turn served bytes into decompressed IDX bytes, naming the fault if they are not."""
    head = raw[:512].lstrip().lower()
    if head.startswith((b"<!doctype", b"<html", b"<?xml", b"<head")) or b"<html" in head:
        raise DataError(
            f"{file.name}: {source} served an HTML page, not an IDX file; check the mirror URL ({MIRROR_ENV})"
        )
    if raw[:2] != GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except EOFError:
        raise DataError(f"{file.name}: truncated gzip from {source} ({len(raw)} bytes); re-download it") from None
    except (gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise DataError(f"{file.name}: corrupt gzip from {source} ({exc}); re-download it") from None


def parse_idx(content: bytes, file: IdxFile, rows: int = 28, cols: int = 28) -> np.ndarray:
    """Parse IDX bytes (LeCun's format) after checking magic, shape and label range."""
    ndim = 3 if file.kind == "images" else 1
    if len(content) < 4 or content[:2] != b"\x00\x00" or content[2] != IDX_UBYTE or content[3] != ndim:
        raise DataError(
            f"{file.name}: wrong IDX magic number {content[:4].hex() or '(empty)'}, "
            f"expected 000008{ndim:02x}; the file is not an IDX {file.kind} file"
        )
    header = 4 + 4 * ndim
    if len(content) < header:
        raise DataError(f"{file.name}: truncated IDX header ({len(content)} bytes)")
    dims = struct.unpack(f">{ndim}I", content[4:header])
    expected = (file.count, rows, cols) if ndim == 3 else (file.count,)
    if dims != expected:
        raise DataError(f"{file.name}: wrong dimensions or item count {dims}, expected {expected}")
    size = int(np.prod(dims))
    if len(content) != header + size:
        raise DataError(f"{file.name}: {len(content) - header} data bytes, expected {size} (truncated or padded)")
    array = np.frombuffer(content, dtype=np.uint8, offset=header).reshape(dims)
    if file.kind == "labels" and array.size and int(array.max()) > 9:
        raise DataError(f"{file.name}: label {int(array.max())} outside 0-9")
    return array


def verify(content: bytes, file: IdxFile, spec: DatasetSpec, source: str) -> np.ndarray:
    """Structure first (for a precise message), then the sha256 that identifies the data."""
    array = parse_idx(content, file, spec.rows, spec.cols)
    digest = atomic.sha256_bytes(content)
    if digest != file.sha256:
        raise DataError(
            f"{file.name}: checksum mismatch from {source}: sha256 {digest}, expected {file.sha256}; "
            "the mirror holds other or corrupted data"
        )
    return array


def fetch_file(file: IdxFile, spec: DatasetSpec, mirrors: list[str], timeout_s: float, retries: int) -> Fetched:
    """Try each mirror in order; the error lists every mirror's fault when all fail."""
    faults = []
    for mirror in mirrors:
        for location in _candidates(mirror, file.name):
            try:
                content = decode_payload(_read(location, timeout_s, retries), file, location)
                verify(content, file, spec, location)
                return Fetched(file, content, location)
            except _NotThere:
                continue
            except DataError as exc:
                faults.append(str(exc))
                break
        else:
            faults.append(f"{file.name}: not found at {mirror}")
    raise DataError(
        f"could not get a valid {file.name} for {spec.name}:\n  "
        + "\n  ".join(faults)
        + f"\nPoint {MIRROR_ENV} at a folder or URL holding the official files (gzipped or raw)."
    )


# ---------------------------------------------------------------- table + schema


def image_table(arrays: dict[tuple[str, str], np.ndarray]) -> pd.DataFrame:
    """One row per image: split, index, label, and pixel min/max/mean on [0, 1]."""
    frames = []
    for split in ("train", "test"):
        images = arrays[(split, "images")].reshape(len(arrays[(split, "images")]), -1)
        frames.append(
            pd.DataFrame(
                {
                    "split": split,
                    "index": np.arange(len(images), dtype=np.int64),
                    "label": arrays[(split, "labels")].astype(np.int64),
                    "pixel_min": images.min(axis=1) / 255.0,
                    "pixel_max": images.max(axis=1) / 255.0,
                    "pixel_mean": images.mean(axis=1, dtype=np.float64) / 255.0,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def image_schema(spec: DatasetSpec) -> pa.DataFrameSchema:
    """The per-image table's contract, including each split's known total."""
    counts = {f.split: f.count for f in spec.files if f.kind == "labels"}
    unit = [pa.Check.ge(0.0), pa.Check.le(1.0)]
    return pa.DataFrameSchema(
        {
            "split": pa.Column(str, pa.Check.isin(list(counts))),
            "index": pa.Column("int64", pa.Check.ge(0)),
            "label": pa.Column("int64", pa.Check.in_range(0, spec.n_classes - 1)),
            "pixel_min": pa.Column(float, unit),
            "pixel_max": pa.Column(float, unit),
            "pixel_mean": pa.Column(float, unit),
        },
        checks=[
            pa.Check(lambda df: (df.pixel_min <= df.pixel_mean) & (df.pixel_mean <= df.pixel_max), name="min<=mean<=max"),
            pa.Check(
                lambda df: df.groupby("split").size().to_dict() == counts,
                name=f"split totals {counts}",
                error=f"split totals must be {counts}",
            ),
        ],
        unique=["split", "index"],
        strict=True,
    )


def validate_table(table: pd.DataFrame, spec: DatasetSpec) -> pd.DataFrame:
    try:
        return image_schema(spec).validate(table, lazy=True)
    except (pa.errors.SchemaErrors, pa.errors.SchemaError) as exc:
        raise DataError(f"{spec.name}: the per-image table failed validation:\n{exc}") from None


# ---------------------------------------------------------------- the dataset folder


def data_hash(shas: dict[str, str]) -> str:
    """One id for the dataset: sha256 over each file's name and sha256."""
    return atomic.sha256_bytes("".join(f"{n} {s}\n" for n, s in sorted(shas.items())).encode())


def is_present(raw_dir: Path, spec: DatasetSpec) -> bool:
    """True when every file is there with its expected sha256 (a rerun then downloads nothing)."""
    manifest = raw_dir / "manifest.json"
    if not manifest.is_file():
        return False
    return all((raw_dir / f.name).is_file() and atomic.sha256_file(raw_dir / f.name) == f.sha256 for f in spec.files)


def write_dataset(raw_dir: Path, spec: DatasetSpec, fetched: list[Fetched]) -> dict:
    """Verify the files and their per-image table (kept in memory only: nothing reads it), then swap the folder in whole."""
    arrays = {(f.file.split, f.file.kind): verify(f.content, f.file, spec, f.source) for f in fetched}
    validate_table(image_table(arrays), spec)
    shas = {f.file.name: f.file.sha256 for f in fetched}
    manifest = {"dataset": spec.name, "files": shas, "data_hash": data_hash(shas)}
    with atomic.atomic_dir(raw_dir) as tmp:
        for f in fetched:
            (tmp / f.file.name).write_bytes(f.content)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def read_manifest(raw_dir: Path) -> dict:
    path = raw_dir / "manifest.json"
    if not path.is_file():
        raise DataError(f"{path} not found: run the download stage first (`dvc repro download`)")
    return json.loads(path.read_text())


def load_split(raw_dir: Path, spec: DatasetSpec, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, rows*cols) uint8 images and (N,) int64 labels of one split, verified."""
    out = []
    for kind in ("images", "labels"):
        file = spec.file(split, kind)
        path = raw_dir / file.name
        if not path.is_file():
            raise DataError(f"{path} not found: run the download stage first (`dvc repro download`)")
        out.append(verify(path.read_bytes(), file, spec, str(path)))
    images, labels = out
    return torch.from_numpy(images.reshape(len(images), -1).copy()), torch.from_numpy(labels.astype(np.int64))
