"""paths.py and dvc.yaml name the same files, so the two cannot drift."""

from __future__ import annotations

import yaml

from conftest import ROOT
from vae_mlops.paths import Paths


def _stage_files(stage: dict) -> set[str]:
    out = set()
    for section in ("outs", "metrics", "plots"):
        for item in stage.get(section, []):
            out.add(next(iter(item)) if isinstance(item, dict) else item)
    return out


def test_dvc_outputs_are_the_paths_module_paths():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    p = Paths()
    expected = {
        "download": {"data/raw/${data.dataset}"},
        "train": {str(p.model_file), str(p.checkpoints_dir), str(p.train_images_dir), str(p.history_file)},
    }
    assert str(p.raw_dir("${data.dataset}")) == "data/raw/${data.dataset}"
    for name, files in expected.items():
        assert _stage_files(dvc[name]) == files, name


def test_stage_commands_run_the_package_cli():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in dvc.items():
        assert stage["cmd"].startswith(f"python -m vae_mlops {name}"), name
