"""`collect`: the images the scoring server recorded since the last snapshot, as a new snapshot.

Rows are read from the inference table (`vae_mlops.inference_log`), screened
(`vae_mlops.snapshots`: shape, range, duplicates of the dataset or of earlier
snapshots, constant images, noise) and written once under `data/incoming/<id>/`.
The runner (`python -m vae_mlops collect`, the `collect` task of `vae-retrain`)
then `dvc add`s the folder and names it in `data.snapshots`. Kept apart from
`snapshots` so that training, which reads snapshots, never loads the table's code.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Mapping

import numpy as np

from vae_mlops import inference_log, snapshots
from vae_mlops.params import DataParams
from vae_mlops.paths import Paths

log = logging.getLogger(__name__)


def collect_images(cfg: DataParams, paths: Paths, images: Iterable[Any], source: Mapping[str, Any]) -> dict:
    """Screen `images` against the dataset and every snapshot present; write the ones kept as a snapshot."""
    known = snapshots.known_hashes(cfg, paths, snapshots.existing(paths))
    screened = snapshots.screen(images, known)
    manifest = snapshots.write_snapshot(paths.incoming_dir, screened, source)
    log.info(
        "snapshot %s: %d of %d recorded images kept (refused: %s)",
        manifest["id"], manifest["count"], manifest["received"],
        ", ".join(f"{n} {r}" for r, n in manifest["rejected"].items() if n) or "none",
    )  # fmt: skip
    return manifest


def last_collected_id(paths: Paths, table: str) -> int:
    """The last row of `table` an earlier snapshot took (0: none): collection goes on from there."""
    ids = [
        int(m["source"]["last_id"])
        for m in (snapshots.read_manifest(paths.incoming_dir, sid) for sid in snapshots.existing(paths))
        if m.get("source", {}).get("table") == table and m["source"].get("last_id") is not None
    ]
    return max(ids, default=0)


def collect(cfg: DataParams, paths: Paths, url: str | None = None, after_id: int | None = None) -> dict:
    """A snapshot of the rows recorded after `after_id` (default: after the last snapshot of this table)."""
    url = url or inference_log.reader_url(paths.root)
    table = inference_log.safe_url(url)  # never a password in a manifest
    start = last_collected_id(paths, table) if after_id is None else after_id
    rows = inference_log.read_since(url, after_id=start)
    if rows.empty:
        raise snapshots.SnapshotError(
            f"no recorded images in {table} after row {start}: nothing to collect; serve traffic first"
        )
    with_image = rows[rows["image"].notna()]
    source = {
        "table": table,
        "first_id": int(rows["id"].min()),
        "last_id": int(rows["id"].max()),
        "rows": int(len(rows)),
        "without_image": int(len(rows) - len(with_image)),  # recorded with serve.log_inputs off
        "versions": sorted({str(v) for v in rows["version"].dropna()}),
        "served_from": float(rows["served_at"].min()),
        "served_to": float(rows["served_at"].max()),
    }
    images: list[np.ndarray] = list(inference_log.images(with_image)) if len(with_image) else []
    return collect_images(cfg, paths, images, source)
