"""The download stage on synthetic IDX files: each fault is named and leaves nothing behind."""

from __future__ import annotations

import gzip
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest

from tests.support.synthetic import NAMES, idx_bytes
from vae_mlops.data import DataError, load_split
from vae_mlops.datasets import get_dataset
from vae_mlops.params import DataParams
from vae_mlops.paths import Paths
from vae_mlops.stages.download import download as run_download

CFG = DataParams(
    dataset="tiny", timeout_s=2.0, retries=2, snapshots=[], incoming_max_fraction=0.2, incoming_holdout=0.2, binarize="none"
)


def copy_mirror(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def assert_nothing_left(root: Path) -> None:
    raw = root / "data" / "raw"
    leftovers = [p for p in raw.rglob("*")] if raw.exists() else []
    assert leftovers == [], leftovers


def test_valid_mirror_gives_verified_data_and_table(data_env, tmp_path):
    manifest = run_download(CFG, Paths(tmp_path))
    raw = tmp_path / "data" / "raw" / "tiny"
    assert sorted(p.name for p in raw.iterdir()) == sorted(
        [*NAMES.values(), "manifest.json"]  # the per-image table is validated in memory, not written
    )
    images, labels = load_split(raw, get_dataset("tiny"), "train")
    assert images.shape == (600, 784) and labels.max() <= 9
    assert len(manifest["data_hash"]) == 64


def test_second_run_downloads_nothing(data_env, tmp_path, monkeypatch):
    first = run_download(CFG, Paths(tmp_path))
    raw = tmp_path / "data" / "raw" / "tiny"
    written = {p.name: p.stat().st_mtime_ns for p in raw.iterdir()}
    monkeypatch.setenv("VAE_DATA_MIRROR", str(tmp_path / "no-such-mirror"))  # any fetch would fail
    assert run_download(CFG, Paths(tmp_path)) == first
    assert {p.name: p.stat().st_mtime_ns for p in raw.iterdir()} == written  # not one file rewritten


def test_raw_files_work_as_well_as_gzipped(tiny_mirror, tmp_path, monkeypatch):
    raw_mirror = tmp_path / "raw-mirror"
    raw_mirror.mkdir()
    for f in tiny_mirror.iterdir():
        (raw_mirror / f.name.removesuffix(".gz")).write_bytes(gzip.decompress(f.read_bytes()))
    monkeypatch.setenv("VAE_DATA_MIRROR", f"file://{raw_mirror}")
    from_raw = run_download(CFG, Paths(tmp_path / "raw"))
    monkeypatch.setenv("VAE_DATA_MIRROR", str(tiny_mirror))
    from_gzip = run_download(CFG, Paths(tmp_path / "gzip"))
    assert from_raw == from_gzip  # the same files, checksums and data hash
    for split in ("train", "test"):
        a, b = (load_split(tmp_path / kind / "data" / "raw" / "tiny", get_dataset("tiny"), split) for kind in ("raw", "gzip"))
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def _replace(mirror: Path, name: str, content: bytes) -> None:
    (mirror / f"{name}.gz").write_bytes(gzip.compress(content))


def _truncate_gzip(m: Path) -> None:
    path = m / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:5000])


def _html_page(m: Path) -> None:
    (m / "train-images-idx3-ubyte.gz").write_bytes(b"<!DOCTYPE html><html><body>Not found</body></html>")


FAULTS = {
    "truncated gzip": (_truncate_gzip, "truncated gzip"),
    "bad magic": (lambda m: _replace(m, NAMES["train", "labels"], b"\x00\x00\x0d\x01" + bytes(604)),
                  "wrong IDX magic number"),
    "wrong count": (lambda m: _replace(m, NAMES["test", "labels"], idx_bytes(np.zeros(199))),
                    "wrong dimensions or item count"),
    "label out of range": (lambda m: _replace(m, NAMES["test", "labels"], idx_bytes(np.full(200, 11))),
                           "label 11 outside 0-9"),
    "checksum": (lambda m: _replace(m, NAMES["test", "labels"], idx_bytes(np.zeros(200))), "checksum mismatch"),
    "html page": (_html_page, "served an HTML page"),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_bad_file_is_named_and_leaves_nothing(tiny_mirror, tmp_path, monkeypatch, fault):
    make, message = FAULTS[fault]
    mirror = copy_mirror(tiny_mirror, tmp_path / "mirror")
    make(mirror)
    monkeypatch.setenv("VAE_DATA_MIRROR", str(mirror))
    with pytest.raises(DataError, match=message):
        run_download(CFG, Paths(tmp_path / "proj"))
    assert_nothing_left(tmp_path / "proj")


def test_bad_mirror_keeps_previous_valid_data(data_env, tmp_path, monkeypatch):
    run_download(CFG, Paths(tmp_path))
    raw = tmp_path / "data" / "raw" / "tiny"
    before = {p.name: p.read_bytes() for p in raw.iterdir()}
    (raw / "manifest.json").unlink()  # force a refetch
    before.pop("manifest.json")
    monkeypatch.setenv("VAE_DATA_MIRROR", str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not found at"):
        run_download(CFG, Paths(tmp_path))
    assert {p.name: p.read_bytes() for p in raw.iterdir()} == before


class _HtmlHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        body = b"<html><head><title>Portal</title></head><body>login</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_http_mirror_serving_html_is_refused(tiny_mirror, tmp_path, monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HtmlHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("VAE_DATA_MIRROR", f"http://127.0.0.1:{server.server_port}/mnist/")
        with pytest.raises(DataError, match="served an HTML page"):
            run_download(CFG, Paths(tmp_path))
    finally:
        server.shutdown()
    assert_nothing_left(tmp_path)


def test_http_mirror_serves_the_dataset(tiny_mirror, tmp_path, monkeypatch):
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(tiny_mirror), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("VAE_DATA_MIRROR", f"http://127.0.0.1:{server.server_port}")
        run_download(CFG, Paths(tmp_path))
    finally:
        server.shutdown()
    assert (tmp_path / "data" / "raw" / "tiny" / "manifest.json").is_file()
