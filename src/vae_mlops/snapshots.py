"""Recorded traffic as training data: screened, de-duplicated, immutable snapshots under `data/incoming/<id>/`.

`vae_mlops.collect` makes them from the rows the scoring server recorded.

A snapshot is `images.npy` (uint8, (N, 784), no pickle) and `manifest.json` (its
sha256, counts, what was refused and why, where the images came from). It is
written once, read-only, and never modified: a new collection is a new snapshot.
DVC tracks each one (`dvc add data/incoming/<id>`); `data.snapshots` in
`params.yaml` names the ones training uses.

Screening, before an image may become training data (the reason is counted in
the manifest):
  - shape: not 784 values; range: not finite, or outside [0, 1] (floats) / 0-255;
  - duplicate: the same bytes as an image of the base dataset (train or test: a
    replayed test digit must never leak into training), of an earlier snapshot,
    or of another image of this collection (sha256 of the 784 bytes);
  - constant: pixel standard deviation under `MIN_PIXEL_STD` grey levels;
  - noise: correlation of neighbouring pixels under `MIN_NEIGHBOUR_CORR`.
Content rules, not the champion's ELBO: traffic that drifted has a low ELBO
under the champion by definition, so an ELBO floor would refuse exactly the new
images the loop exists to learn from.

Each snapshot image goes to train, validation or test by its content hash
(`data.incoming_holdout`, half each to validation and test), so the split never
depends on order or on which other images arrived; `data.incoming_max_fraction`
caps the snapshot images' share of the training set (those with the lowest hash
are kept), so a flood of traffic cannot take over the model.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from vae_mlops import atomic, data
from vae_mlops.datasets import get_dataset
from vae_mlops.errors import VaeMlopsError
from vae_mlops.params import SNAPSHOT_ID, DataParams
from vae_mlops.paths import Paths

PIXELS = 784
IMAGES_FILE = "images.npy"
MANIFEST_FILE = "manifest.json"
UNLABELLED = -1  # the label of a recorded image in the test split: the traffic carries no labels
# Measured on the MNIST and Fashion-MNIST test sets: no image has a neighbour correlation
# under 0.24 (MNIST 0.49), uniform and salt-and-pepper noise stay under 0.05.
MIN_NEIGHBOUR_CORR = 0.2
MIN_PIXEL_STD = 2.0  # grey levels of 255; the least varied test image of either set has 18
REASONS = ("shape", "range", "duplicate", "constant", "noise")


class SnapshotError(VaeMlopsError):
    """A snapshot is missing, altered, or could not be made; the message says what to do."""


# ---------------------------------------------------------------- screening


@dataclass(frozen=True)
class Screened:
    """The images fit for training (uint8 (N, 784)) and how many of the others were refused, by reason."""

    images: np.ndarray
    rejected: dict[str, int] = field(default_factory=dict)

    @property
    def received(self) -> int:
        return len(self.images) + sum(self.rejected.values())


def content_hash(image_u8: np.ndarray) -> bytes:
    """sha256 of an image's 784 bytes: what 'the same image' means everywhere here."""
    return hashlib.sha256(np.ascontiguousarray(image_u8, dtype=np.uint8).tobytes()).digest()


def as_uint8(row: Any) -> np.ndarray | str:
    """One recorded image as (784,) uint8, or the reason it is not one (`shape`, `range`)."""
    if isinstance(row, (bytes, bytearray, memoryview)):
        arr = np.frombuffer(bytes(row), dtype=np.uint8)
        return arr if arr.size == PIXELS else "shape"
    arr = np.asarray(row)
    if arr.size != PIXELS or arr.dtype.kind not in "uif":
        return "shape"
    arr = arr.reshape(PIXELS)
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype.kind == "f":  # the model's input scale: [0, 1]
        if not np.isfinite(arr).all() or arr.min() < 0.0 or arr.max() > 1.0:
            return "range"
        return np.rint(arr.astype(np.float64) * 255.0).astype(np.uint8)
    if arr.min() < 0 or arr.max() > 255:
        return "range"
    return arr.astype(np.uint8)


def neighbour_corr(images_u8: np.ndarray) -> np.ndarray:
    """Per image (N,): correlation of each pixel with its right and lower neighbours (natural images ~0.8, noise ~0)."""
    x = images_u8.reshape(-1, 28, 28).astype(np.float64)
    n = len(x)
    a = np.concatenate([x[:, :, :-1].reshape(n, -1), x[:, :-1, :].reshape(n, -1)], axis=1)
    b = np.concatenate([x[:, :, 1:].reshape(n, -1), x[:, 1:, :].reshape(n, -1)], axis=1)
    a -= a.mean(axis=1, keepdims=True)
    b -= b.mean(axis=1, keepdims=True)
    denom = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    return np.divide((a * b).sum(axis=1), denom, out=np.zeros(n), where=denom > 0)


def screen(rows: Iterable[Any], known: set[bytes] | None = None) -> Screened:
    """Keep the rows that are images, new (by content hash, against `known` too) and neither constant nor noise."""
    seen = set(known or ())
    rejected = dict.fromkeys(REASONS, 0)
    kept: list[np.ndarray] = []
    for row in rows:
        image = as_uint8(row)
        if isinstance(image, str):
            rejected[image] += 1
            continue
        digest = content_hash(image)
        if digest in seen:
            rejected["duplicate"] += 1
            continue
        seen.add(digest)
        kept.append(image)
    images = np.stack(kept) if kept else np.zeros((0, PIXELS), dtype=np.uint8)
    constant = images.astype(np.float64).std(axis=1) < MIN_PIXEL_STD
    noise = ~constant & (neighbour_corr(images) < MIN_NEIGHBOUR_CORR)
    rejected["constant"] += int(constant.sum())
    rejected["noise"] += int(noise.sum())
    return Screened(images[~constant & ~noise], rejected)


def base_hashes(cfg: DataParams, paths: Paths) -> set[bytes]:
    """Content hashes of every image of the base dataset (train and test)."""
    spec = get_dataset(cfg.dataset)
    raw_dir = paths.raw_dir(cfg.dataset)
    out: set[bytes] = set()
    for split in ("train", "test"):
        images, _ = data.load_split(raw_dir, spec, split)
        out.update(content_hash(img) for img in images.numpy())
    return out


# ---------------------------------------------------------------- writing and reading


def snapshot_id(images_u8: np.ndarray, now: datetime | None = None) -> str:
    """`<UTC time>-<first 8 hex of the images' sha256>`: sorts by time, and names its content."""
    now = now or datetime.now(timezone.utc)
    return f"{now:%Y%m%dT%H%M%SZ}-{hashlib.sha256(images_u8.tobytes()).hexdigest()[:8]}"


def _npy_bytes(images_u8: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(images_u8, dtype=np.uint8), allow_pickle=False)
    return buf.getvalue()


def write_snapshot(incoming_dir: Path, screened: Screened, source: Mapping[str, Any]) -> dict:
    """Write `incoming_dir/<id>/` once (read-only files, the folder swapped in whole); return its manifest.

    Refuses an empty collection and an id that exists (snapshots are never rewritten).
    """
    if len(screened.images) == 0:
        raise SnapshotError(
            f"nothing to snapshot: none of the {screened.received} recorded image(s) passed screening "
            f"(refused: {_refused(screened.rejected)}); record more traffic first"
        )
    sid = snapshot_id(screened.images)
    target = incoming_dir / sid
    if target.exists():
        raise SnapshotError(f"{target} exists already: snapshots are written once; collect again in a second")
    content = _npy_bytes(screened.images)
    manifest = {
        "id": sid,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "count": int(len(screened.images)),
        "received": int(screened.received),
        "rejected": dict(screened.rejected),
        "rules": {"min_neighbour_corr": MIN_NEIGHBOUR_CORR, "min_pixel_std": MIN_PIXEL_STD},
        "files": {IMAGES_FILE: atomic.sha256_bytes(content)},
        "source": dict(source),
    }
    with atomic.atomic_dir(target) as tmp:
        (tmp / IMAGES_FILE).write_bytes(content)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        for f in (IMAGES_FILE, MANIFEST_FILE):
            (tmp / f).chmod(0o444)
    return manifest


def _refused(rejected: Mapping[str, int]) -> str:
    return ", ".join(f"{n} {r}" for r, n in rejected.items() if n) or "none"


def read_manifest(incoming_dir: Path, sid: str) -> dict:
    path = incoming_dir / sid / MANIFEST_FILE
    if not SNAPSHOT_ID.match(sid):
        raise SnapshotError(f"data.snapshots: {sid!r} is not a snapshot id (like 20261206T041200Z-3fa2c1d0)")
    if not path.is_file():
        raise SnapshotError(
            f"snapshot {sid} not found ({path}): `dvc pull data/incoming/{sid}` (or `dvc checkout`) to fetch it, "
            "or remove it from data.snapshots in params.yaml"
        )
    return json.loads(path.read_text())


def read_snapshot(incoming_dir: Path, sid: str) -> np.ndarray:
    """The snapshot's uint8 (N, 784) images, after checking them against its manifest's sha256 and count."""
    manifest = read_manifest(incoming_dir, sid)
    path = incoming_dir / sid / IMAGES_FILE
    content = path.read_bytes() if path.is_file() else b""
    if atomic.sha256_bytes(content) != manifest["files"][IMAGES_FILE]:
        raise SnapshotError(
            f"{path}: sha256 differs from its manifest: the snapshot was altered or is incomplete; "
            f"`dvc checkout data/incoming/{sid}` restores it"
        )
    images = np.load(io.BytesIO(content), allow_pickle=False)
    if images.dtype != np.uint8 or images.shape != (manifest["count"], PIXELS):
        raise SnapshotError(f"{path}: holds {images.dtype} {images.shape}, expected uint8 ({manifest['count']}, 784)")
    return images


# ---------------------------------------------------------------- training on base + snapshots


@dataclass(frozen=True)
class Incoming:
    """The named snapshots' images by split (uint8 (N, 784)), after de-duplication and the cap."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    capped: int  # training images left out by data.incoming_max_fraction


def _unit_hash(images_u8: np.ndarray) -> np.ndarray:
    """A number on [0, 1) per image, from its content hash: the split and the cap depend on nothing else."""
    return np.array([int.from_bytes(content_hash(img)[:8], "big") / 2.0**64 for img in images_u8])


def cap(n_base_train: int, max_fraction: float) -> int:
    """The most snapshot images a training set of `n_base_train` base images may take: share <= max_fraction."""
    return int(np.floor(max_fraction * n_base_train / (1.0 - max_fraction) + 1e-9))


def load_incoming(cfg: DataParams, paths: Paths, n_base_train: int) -> Incoming:
    """Every snapshot named in `data.snapshots`, split by content hash and capped; an image in two counts once."""
    empty = np.zeros((0, PIXELS), dtype=np.uint8)
    if not cfg.snapshots:
        return Incoming(empty, empty, empty, 0)
    parts, seen = [], set()
    for sid in cfg.snapshots:
        images = read_snapshot(paths.incoming_dir, sid)
        keep = []
        for i, img in enumerate(images):
            digest = content_hash(img)
            if digest not in seen:
                seen.add(digest)
                keep.append(i)
        parts.append(images[keep])
    images = np.concatenate(parts)
    u = _unit_hash(images)
    val, test = u < cfg.incoming_holdout / 2, (u >= cfg.incoming_holdout / 2) & (u < cfg.incoming_holdout)
    train_idx = np.flatnonzero(~val & ~test)
    limit = cap(n_base_train, cfg.incoming_max_fraction)
    kept = train_idx[np.argsort(u[train_idx], kind="stable")[:limit]]
    return Incoming(images[np.sort(kept)], images[val], images[test], len(train_idx) - len(kept))


def data_hash(cfg: DataParams, paths: Paths) -> str:
    """The data's identity: the base dataset's hash, or, with snapshots, a hash over it, theirs and the split rules."""
    base = data.read_manifest(paths.raw_dir(cfg.dataset))["data_hash"]
    if not cfg.snapshots:
        return base  # unchanged from a pipeline without snapshots: its champions need no re-scoring
    lines = [f"base {base}"]
    lines += [f"snapshot {sid} {read_manifest(paths.incoming_dir, sid)['files'][IMAGES_FILE]}" for sid in cfg.snapshots]
    lines += [f"incoming_holdout {cfg.incoming_holdout!r}", f"incoming_max_fraction {cfg.incoming_max_fraction!r}"]
    return atomic.sha256_bytes(("\n".join(lines) + "\n").encode())


def training_manifest(cfg: DataParams, paths: Paths) -> dict:
    """The base manifest with every named snapshot among its files and the combined `data_hash`."""
    manifest = dict(data.read_manifest(paths.raw_dir(cfg.dataset)))
    files = dict(manifest.get("files", {}))
    for sid in cfg.snapshots:
        files[f"incoming/{sid}"] = read_manifest(paths.incoming_dir, sid)["files"][IMAGES_FILE]
    return {**manifest, "files": files, "data_hash": data_hash(cfg, paths), "snapshots": list(cfg.snapshots)}


def existing(paths: Paths) -> list[str]:
    """Snapshot ids present under `data/incoming/`, oldest first."""
    if not paths.incoming_dir.is_dir():
        return []
    return sorted(p.name for p in paths.incoming_dir.iterdir() if p.is_dir() and SNAPSHOT_ID.match(p.name))


def known_hashes(cfg: DataParams, paths: Paths, snapshot_ids: Sequence[str]) -> set[bytes]:
    """Content hashes a new snapshot must not repeat: the base dataset and the given snapshots."""
    out = base_hashes(cfg, paths)
    for sid in snapshot_ids:
        out.update(content_hash(img) for img in read_snapshot(paths.incoming_dir, sid))
    return out
