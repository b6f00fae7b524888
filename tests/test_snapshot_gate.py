"""The loop's data path with the real tools: a snapshot is `dvc add`ed, `dvc repro` trains on it, and the gate
re-scores the champion on the new test split (the dataset's plus the snapshot's share) and promotes the new version.

The shifted traffic is smooth blobs, nothing like the tiny dataset's strokes: the champion never saw such images,
the candidate trained on some of them, so it must win on a test split that holds the rest.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from tests.support.e2e import copy_project, dvc, tool_env
from tests.test_snapshots import blobs, junk
from vae_mlops import checkpoint, cli, data, metrics, snapshots
from vae_mlops.datasets import get_dataset
from vae_mlops.params import parse_params
from vae_mlops.paths import Paths
from vae_mlops.collect import collect_images
from vae_mlops.stage_inputs import load_test_split

pytestmark = pytest.mark.slow


def test_a_model_retrained_on_a_snapshot_wins_the_gate_on_the_new_test_split(tiny_mirror, tmp_path, monkeypatch):
    repo = copy_project(tmp_path / "repo", **{"train.epochs": 2, "data.incoming_holdout": 0.5})
    env = tool_env(VAE_DATA_MIRROR=str(tiny_mirror))
    monkeypatch.setenv("VAE_DATA_MIRROR", str(tiny_mirror))
    for stage in ("download", "train", "evaluate", "register"):  # the first champion, in this process (faster)
        assert cli.main([stage, "--root", str(repo), "--params", str(repo / "params.yaml")]) == 0, stage
    first = json.loads((repo / "reports" / "registration.json").read_text())
    champion, _ = checkpoint.load_model(repo / "models" / "vae.pt")

    # the traffic: shifted images, junk, and replayed test digits (never to be trained on)
    paths = Paths(repo)
    params = parse_params(yaml.safe_load((repo / "params.yaml").read_text()))
    replayed, _ = data.load_split(paths.raw_dir("tiny"), get_dataset("tiny"), "test")
    manifest = collect_images(params.data, paths, [*blobs(300, seed=11), *junk(12), *replayed[:50].numpy()], {})
    assert manifest["count"] == 300 and manifest["rejected"]["duplicate"] == 50
    sid = manifest["id"]
    dvc("add", f"data/incoming/{sid}", cwd=repo, env=env)
    assert (repo / "data" / "incoming" / f"{sid}.dvc").is_file()

    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["data"]["snapshots"] = [sid]
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    out = dvc("repro", cwd=repo, env=env)
    second = json.loads((repo / "reports" / "registration.json").read_text())
    assert second["decision"] == "promoted" and second["alias"] == "champion", second
    assert second["champion_version"] == first["version"], out.stdout + out.stderr
    assert "re-scored on the current test data" in second["reason"]

    # the champion's score is the one it gets on the new test split, snapshot share included
    params = parse_params(raw)
    x, labels = load_test_split(params, paths, torch.device("cpu"))
    assert (labels == snapshots.UNLABELLED).sum() > 0
    expected = metrics.evaluate_model(champion.eval(), x, labels, params.evaluate)[params.register.metric]
    assert second["champion_value"] == pytest.approx(expected, rel=1e-6, abs=1e-6)
    assert second["value"] < second["champion_value"]
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert lock["train"]["params"]["params.yaml"]["data.snapshots"] == [sid]
    assert dvc("status", cwd=repo, env=env).stdout.strip() == "Data and pipelines are up to date."
