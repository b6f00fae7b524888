"""paths.py and dvc.yaml name the same files, so the two cannot drift."""

from __future__ import annotations

import yaml

from tests.support.project import ROOT
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
        "train": {
            str(p.model_file), str(p.checkpoints_dir), str(p.train_images_dir), str(p.history_file),
            str(p.train_run_file),
        },
        "evaluate": {str(p.metrics_file), str(p.eval_images_dir)},
        "register": {str(p.registration_file), str(p.promotion_log), str(p.compare_html), str(p.compare_md)},
    }
    assert str(p.raw_dir("${data.dataset}")) == "data/raw/${data.dataset}"
    assert set(dvc) == set(expected)
    for name, files in expected.items():
        assert _stage_files(dvc[name]) == files, name


def test_later_stages_depend_on_the_run_file_that_train_writes():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    run_file = str(Paths().train_run_file)
    for name in ("evaluate", "register"):
        assert run_file in dvc[name]["deps"] and str(Paths().model_file) in dvc[name]["deps"], name
    assert str(Paths().metrics_file) in dvc["register"]["deps"]


def test_the_promotion_log_survives_reruns_and_checkouts():
    """DVC deletes a stage's outputs before it runs and restores cached ones on checkout: not this one."""
    outs = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["register"]["outs"]
    spec = next(o for o in outs if isinstance(o, dict) and str(Paths().promotion_log) in o)
    assert spec[str(Paths().promotion_log)] == {"persist": True, "cache": False}


def test_stage_commands_run_the_package_cli():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in dvc.items():
        assert stage["cmd"].startswith(f"python -m vae_mlops {name}"), name
