"""The download stage: fetch and verify the dataset into `data/raw/<dataset>/`."""

from __future__ import annotations

import logging

from vae_mlops import data
from vae_mlops.datasets import get_dataset
from vae_mlops.params import DataParams
from vae_mlops.paths import Paths

log = logging.getLogger(__name__)


def download(cfg: DataParams, paths: Paths) -> dict:
    """Fetch and verify the dataset's four IDX files into `data/raw/<dataset>/`.

    Valid files already present are kept and nothing is downloaded.
    """
    spec = get_dataset(cfg.dataset)
    raw_dir = paths.raw_dir(cfg.dataset)
    if data.is_present(raw_dir, spec):
        log.info("%s already present and verified in %s: nothing downloaded", spec.name, raw_dir)
        return data.read_manifest(raw_dir)
    mirrors = data.mirror_list(spec)
    fetched = []
    for file in spec.files:
        got = data.fetch_file(file, spec, mirrors, cfg.timeout_s, cfg.retries)
        log.info("%s: %d bytes from %s, sha256 ok", file.name, len(got.content), got.source)
        fetched.append(got)
    manifest = data.write_dataset(raw_dir, spec, fetched)
    log.info("%s written to %s (data hash %s)", spec.name, raw_dir, manifest["data_hash"][:12])
    return manifest
