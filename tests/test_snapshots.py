"""Recorded traffic as training data: screening, immutable snapshots, the hash split, the cap, the data hash.

The images that must pass are smooth blobs (neighbouring pixels agree, as in a digit or a garment);
the junk is uniform noise, salt-and-pepper, constant images, wrong lengths, NaN and out-of-range values.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.support.project import ROOT, tiny_raw_params
from vae_mlops import cli, data, inference_log, snapshots
from vae_mlops.datasets import get_dataset
from vae_mlops.params import ParamsError, parse_params
from vae_mlops.paths import Paths
from vae_mlops.collect import collect
from vae_mlops.stages.download import download
from vae_mlops.stage_inputs import load_test_split, load_train_data

CPU = torch.device("cpu")


def blobs(n: int, seed: int) -> np.ndarray:
    """(n, 784) uint8: three Gaussian blobs each, bright on black, smooth like a drawn shape."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28]
    out = np.zeros((n, 28, 28))
    for i in range(n):
        for _ in range(3):
            cy, cx, s = rng.uniform(6, 22), rng.uniform(6, 22), rng.uniform(2, 4)
            out[i] += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    return (np.clip(out, 0, 1) * 255).astype(np.uint8).reshape(n, 784)


def junk(seed: int) -> list:
    """One of each kind of junk; `screen` must refuse all nine."""
    rng = np.random.default_rng(seed)
    return [
        rng.integers(0, 256, 784, dtype=np.uint8),  # uniform noise
        ((rng.random(784) < 0.2) * 255).astype(np.uint8),  # salt and pepper
        rng.random(784).astype(np.float32),  # uniform noise on [0, 1]
        np.zeros(784, dtype=np.uint8),  # black
        np.full(784, 128, dtype=np.uint8).tobytes(),  # grey, as the 784 bytes the server records
        np.full(784, np.nan, dtype=np.float32),  # not finite
        np.full(784, 1.5, dtype=np.float32),  # outside [0, 1]
        np.zeros(783, dtype=np.uint8),  # one pixel short
        b"\x00" * 100,  # a short byte string
    ]


@pytest.fixture
def project(tiny_mirror, monkeypatch, tmp_path) -> tuple[Paths, dict]:
    """A folder with the tiny dataset downloaded, and its raw params (no snapshots yet)."""
    monkeypatch.setenv("VAE_DATA_MIRROR", str(tiny_mirror))
    paths = Paths(tmp_path)
    raw = tiny_raw_params()
    download(parse_params(raw).data, paths)
    return paths, raw


def with_snapshots(raw: dict, ids: list[str], **data_keys) -> dict:
    return {**raw, "data": {**raw["data"], "snapshots": list(ids), **data_keys}}


def snapshot_of(paths: Paths, images, raw: dict) -> str:
    """Screen `images` against the dataset and earlier snapshots, write them; the new id."""
    params = parse_params(raw)
    known = snapshots.known_hashes(params.data, paths, snapshots.existing(paths))
    return snapshots.write_snapshot(paths.incoming_dir, snapshots.screen(images, known), {"test": True})["id"]


def rows(t: torch.Tensor) -> set[bytes]:
    """The images of a float tensor on [0, 1] as their uint8 bytes."""
    return {bytes(r) for r in t.mul(255).round().to(torch.uint8).numpy()}


# ---------------------------------------------------------------- screening


def test_every_kind_of_junk_is_refused_with_its_reason_and_smooth_images_pass():
    good = blobs(20, seed=0)
    screened = snapshots.screen([*good, *junk(1)])
    assert np.array_equal(screened.images, good)
    assert screened.rejected == {"shape": 2, "range": 2, "duplicate": 0, "constant": 2, "noise": 3}


def test_duplicates_by_content_are_dropped_within_a_collection_and_against_known_images():
    good = blobs(10, seed=2)
    known = {snapshots.content_hash(good[0])}
    floats = good[3].astype(np.float32) / 255.0  # the same image sent as floats: the same bytes once rounded
    screened = snapshots.screen([*good, good[5], floats], known)
    assert screened.rejected["duplicate"] == 3
    assert np.array_equal(screened.images, good[1:])


def test_real_test_images_pass_the_content_rules():
    """No image of the MNIST or Fashion-MNIST test set is taken for junk (where the mirror holds them)."""
    mirror = Path(os.environ.get(data.MIRROR_ENV, "/work/shared/data/mnist"))
    found = 0
    for folder in (mirror, mirror.parent / "fashion-mnist"):
        path = folder / "t10k-images-idx3-ubyte.gz"
        if not path.is_file():
            continue
        images = np.frombuffer(gzip.decompress(path.read_bytes()), np.uint8, offset=16).reshape(-1, 784)
        screened = snapshots.screen(images)
        assert screened.rejected["noise"] == screened.rejected["constant"] == 0, folder
        found += 1
    if not found:
        pytest.skip(f"no real test images under {mirror}")


# ---------------------------------------------------------------- snapshots on disk


def test_a_snapshot_is_written_once_read_only_and_verified_on_read(project):
    paths, raw = project
    sid = snapshot_of(paths, blobs(30, seed=3), raw)
    folder = paths.incoming_dir / sid
    assert snapshots.read_snapshot(paths.incoming_dir, sid).shape == (30, 784)
    assert all(not os.access(f, os.W_OK) or os.geteuid() == 0 for f in folder.iterdir())
    assert all((f.stat().st_mode & 0o222) == 0 for f in folder.iterdir())
    manifest = snapshots.read_manifest(paths.incoming_dir, sid)
    assert manifest["count"] == 30 and manifest["source"] == {"test": True}
    with pytest.raises(snapshots.SnapshotError, match="written once"):  # the same content in the same second
        snapshots.write_snapshot(paths.incoming_dir, snapshots.screen(blobs(30, seed=3)), {})
    images = folder / snapshots.IMAGES_FILE
    images.chmod(0o644)
    images.write_bytes(images.read_bytes()[:-784])  # someone cut the last image off
    with pytest.raises(snapshots.SnapshotError, match="sha256 differs from its manifest"):
        snapshots.read_snapshot(paths.incoming_dir, sid)


def test_a_collection_of_only_junk_or_known_images_writes_nothing(project):
    paths, raw = project
    base, _ = data.load_split(paths.raw_dir("tiny"), get_dataset("tiny"), "test")
    with pytest.raises(snapshots.SnapshotError, match=r"none of the 11 recorded image.*: 2 shape, 2 range, 2 duplicate,"):
        snapshot_of(paths, [*junk(4), *base[:2].numpy()], raw)  # a replayed test digit is a duplicate
    assert snapshots.existing(paths) == []


def test_snapshot_ids_in_params_are_checked():
    with pytest.raises(ParamsError, match=r"data\.snapshots\.0: must be a snapshot id"):
        parse_params(with_snapshots(tiny_raw_params(), ["../raw"]))


# ---------------------------------------------------------------- training on base + snapshots


def test_snapshot_images_split_by_content_hash_and_the_cap_holds(project):
    paths, raw = project
    images = blobs(400, seed=5)
    sid = snapshot_of(paths, images, raw)
    params = parse_params(with_snapshots(raw, [sid], incoming_max_fraction=0.1, incoming_holdout=0.3))
    inc = snapshots.load_incoming(params.data, paths, n_base_train=500)
    assert len(inc.train) == snapshots.cap(500, 0.1) == 55  # 55 / (500 + 55) <= 0.1 < 56 / 556
    assert len(inc.val) + len(inc.test) == pytest.approx(0.3 * 400, abs=25) and len(inc.val) and len(inc.test)
    splits = [{bytes(r) for r in part} for part in (inc.train, inc.val, inc.test)]
    assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])
    # the same images in another order, in another snapshot: the same split
    sid2 = snapshots.write_snapshot(paths.incoming_dir, snapshots.screen(images[::-1]), {})["id"]
    again = snapshots.load_incoming(parse_params(with_snapshots(raw, [sid2], incoming_max_fraction=0.1,
                                                                incoming_holdout=0.3)).data, paths, 500)  # fmt: skip
    assert [{bytes(r) for r in part} for part in (again.train, again.val, again.test)] == splits


def test_training_and_test_splits_hold_the_snapshot_shares_and_no_junk(project):
    paths, raw = project
    good, bad = blobs(200, seed=6), junk(7)
    sid = snapshot_of(paths, [*good, *bad], raw)
    params = parse_params(with_snapshots(raw, [sid]))
    td = load_train_data(params, paths, CPU)
    x_test, labels = load_test_split(params, paths, CPU)
    seen = rows(td.x_train) | rows(td.x_val) | rows(x_test)
    inc = snapshots.load_incoming(params.data, paths, n_base_train=500)
    assert inc.capped > 0 and len({bytes(g) for g in good} & seen) == 200 - inc.capped  # the rest: over the cap
    assert not {bytes(snapshots.as_uint8(b)) for b in bad if not isinstance(snapshots.as_uint8(b), str)} & seen
    assert len(td.x_train) == 500 + len(inc.train) and len(td.x_val) == 100 + len(inc.val)
    assert (labels == snapshots.UNLABELLED).sum() == len(inc.test) > 0 and len(x_test) == 200 + len(inc.test)


def test_the_data_hash_covers_the_snapshots_and_their_rules(project):
    paths, raw = project
    base = data.read_manifest(paths.raw_dir("tiny"))["data_hash"]
    assert snapshots.data_hash(parse_params(raw).data, paths) == base  # no snapshots: as before
    sid = snapshot_of(paths, blobs(50, seed=8), raw)
    with_one = snapshots.data_hash(parse_params(with_snapshots(raw, [sid])).data, paths)
    capped = snapshots.data_hash(parse_params(with_snapshots(raw, [sid], incoming_max_fraction=0.05)).data, paths)
    assert len({base, with_one, capped}) == 3
    manifest = snapshots.training_manifest(parse_params(with_snapshots(raw, [sid])).data, paths)
    assert manifest["data_hash"] == with_one and f"incoming/{sid}" in manifest["files"]


def test_a_named_snapshot_that_is_not_there_says_how_to_fetch_it(project):
    paths, raw = project
    params = parse_params(with_snapshots(raw, ["20990101T000000Z-00000000"]))
    with pytest.raises(snapshots.SnapshotError, match="dvc pull data/incoming/20990101T000000Z-00000000"):
        load_train_data(params, paths, CPU)


# ---------------------------------------------------------------- dvc.yaml


def test_train_evaluate_and_register_depend_on_the_snapshots_and_their_params():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name in ("train", "evaluate", "register"):
        assert str(Paths().incoming_dir) in stages[name]["deps"], name
        assert {"data.snapshots", "data.incoming_max_fraction", "data.incoming_holdout"} <= set(stages[name]["params"])


# ---------------------------------------------------------------- collect from the inference table


def test_collect_takes_the_recorded_rows_after_the_last_snapshot_and_refuses_junk(project):
    paths, raw = project
    url = f"sqlite:///{paths.root / 'inference.db'}"
    rec = inference_log.Recorder(url, log_inputs=True, flush_s=0.05)
    scores = {"elbo": np.zeros(1), "mu": np.zeros((1, 4), np.float32)}

    def send(images) -> None:  # what the scoring server records: each answered image, its version
        for img in images:
            x = np.asarray(img, dtype=np.uint8).reshape(1, 784)
            rec.record(None, x, model_name="vae-mnist", version="1", **scores)
        assert rec.flush(10.0)

    first, second = blobs(40, seed=20), blobs(30, seed=21)
    send([*first, *[snapshots.as_uint8(j) for j in junk(22)[:5]]])  # the junk a server answers: 784 values in [0, 1]
    cfg = parse_params(raw).data
    one = collect(cfg, paths, url)
    assert one["count"] == 40 and one["rejected"]["noise"] == 3 and one["rejected"]["constant"] == 2
    assert one["source"]["first_id"] == 1 and one["source"]["last_id"] == 45 and one["source"]["versions"] == ["1"]
    send([*second, *first[:5]])  # new images, and five seen before
    two = collect(cfg, paths, url)
    assert two["count"] == 30 and two["rejected"]["duplicate"] == 5 and two["source"]["first_id"] == 46
    with pytest.raises(snapshots.SnapshotError, match="no recorded images .* after row 80"):
        collect(cfg, paths, url)
    rec.close()
    assert snapshots.existing(paths) == sorted([one["id"], two["id"]])


def test_the_collect_command_writes_a_snapshot_and_says_so_when_there_is_nothing(project, capsys):
    paths, raw = project
    (paths.root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    url = f"sqlite:///{paths.root / 'inference.db'}"
    argv = ["collect", "--root", str(paths.root), "--params", str(paths.root / "params.yaml"), "--db", url, "--no-dvc"]
    inference_log.ensure_table(url)
    assert cli.main(argv) == 2
    assert "no recorded images" in capsys.readouterr().err
    rec = inference_log.Recorder(url, log_inputs=True, flush_s=0.05)
    rec.record(None, blobs(12, seed=30), model_name="vae-mnist", version="3",
               elbo=np.zeros(12), mu=np.zeros((12, 4), np.float32))  # fmt: skip
    rec.close()
    assert cli.main(argv) == 0
    out = capsys.readouterr()
    sid = snapshots.existing(paths)[0]
    assert f"snapshot {sid}: 12 images" in out.err and '"count": 12' in out.out
