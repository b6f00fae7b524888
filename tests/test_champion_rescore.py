"""A champion registered on other test data is re-scored by the real register stage, on the current split.

`dvc repro` registers a first champion on the tiny dataset; the dataset's test split is then replaced (a new
data hash), and `dvc repro` again trains, evaluates and registers a challenger. The gate cannot compare the
champion's recorded score (other data): the stage must load the champion and evaluate it on the current
test split with the evaluate settings; the value it records must equal that evaluation done here.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tests.support.e2e import copy_project, dvc, tool_env
from tests.support.synthetic import NAMES, digits, idx_bytes
from vae_mlops import checkpoint, metrics
from vae_mlops.params import parse_params
from vae_mlops.paths import Paths
from vae_mlops.stage_inputs import load_test_split

pytestmark = pytest.mark.slow


def new_test_split(tiny_mirror: Path, folder: Path) -> Path:
    """The tiny dataset with another test split (same sizes): a new mirror and its VAE_EXTRA_DATASETS file."""
    mirror = Path(shutil.copytree(tiny_mirror, folder / "mirror"))
    specs = yaml.safe_load(Path(tool_env()["VAE_EXTRA_DATASETS"]).read_text())
    images, labels = digits(200, seed=99)
    shas = {}
    for kind, array in (("images", images), ("labels", labels)):
        raw = idx_bytes(array)
        (mirror / f"{NAMES['test', kind]}.gz").write_bytes(gzip.compress(raw, mtime=0))
        shas[NAMES["test", kind]] = hashlib.sha256(raw).hexdigest()
    for f in specs["tiny"]["files"]:
        f["sha256"] = shas.get(f["name"], f["sha256"])
    (folder / "datasets.yaml").write_text(yaml.safe_dump(specs))
    return folder


def test_a_champion_on_other_test_data_is_rescored_by_the_register_stage(tiny_mirror, tmp_path, monkeypatch):
    repo = copy_project(tmp_path / "repo", **{"train.epochs": 1})
    dvc("repro", cwd=repo, env=tool_env(VAE_DATA_MIRROR=str(tiny_mirror)))
    first = json.loads((repo / "reports" / "registration.json").read_text())
    assert first["alias"] == "champion"
    champion_file = tmp_path / "champion.pt"
    shutil.copy2(repo / "models" / "vae.pt", champion_file)

    changed = new_test_split(tiny_mirror, tmp_path / "changed")
    env = tool_env(VAE_DATA_MIRROR=str(changed / "mirror"), VAE_EXTRA_DATASETS=str(changed / "datasets.yaml"))
    dvc("repro", "-f", "download", cwd=repo, env=env)  # DVC cannot see a mirror's content: fetch again
    out = dvc("repro", cwd=repo, env=env)
    second = json.loads((repo / "reports" / "registration.json").read_text())
    assert second["champion_version"] == first["version"], out.stdout + out.stderr

    monkeypatch.setenv("VAE_EXTRA_DATASETS", str(changed / "datasets.yaml"))
    params = parse_params(yaml.safe_load((repo / "params.yaml").read_text()))
    x, labels = load_test_split(params, Paths(repo), torch.device("cpu"))
    champion, _ = checkpoint.load_model(champion_file)
    expected = metrics.evaluate_model(champion.eval(), x, labels, params.evaluate)[params.register.metric]
    recorded_first = first["value"]
    assert expected != pytest.approx(recorded_first, rel=1e-9)  # other data: the old score would not do
    assert second["champion_value"] == pytest.approx(expected, rel=1e-6, abs=1e-6), (second, expected)
