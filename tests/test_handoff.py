"""The worker hand-off: only the train stage's declared outputs and lock entry are adopted; anything else writes nothing."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from pipeline import dvcrun, flows
from tests.support.e2e import copy_project, run


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return copy_project(tmp_path_factory.mktemp("handoff") / "orchestrator")


@pytest.fixture(scope="module")
def good(repo) -> dict:
    """A hand-off as a worker that trained with this checkout's dvc.yaml sends it."""
    declared = dvcrun._stage_paths(repo, dvcrun.TRAIN)
    entry = {
        "cmd": declared["cmd"],
        "deps": [{"path": d, "hash": "md5", "md5": "0" * 32, "size": 1} for d in sorted(declared["deps"])],
        "params": {"params.yaml": {"train": {"epochs": 2}}},
        "outs": [{"path": o, "hash": "md5", "md5": "1" * 32, "size": 2} for o, _ in declared["outs"]],
    }
    files = {"reports/train_history.csv": "epoch,train_loss\n1,0.5\n", "reports/mlflow_run.json": '{"run_id": "r"}'}
    return {"lock": {dvcrun.TRAIN: entry}, "files": files}


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file() and ".git" not in p.parts}


def test_a_good_handoff_writes_the_lock_entry_and_the_files(repo, good, tmp_path):
    target = copy_project(tmp_path / "adopter")
    dvcrun.adopt(target, good)
    assert yaml.safe_load((target / "dvc.lock").read_text())["stages"] == good["lock"]
    for rel, text in good["files"].items():
        assert (target / rel).read_text() == text


def _bad(good: dict, change) -> dict:
    data = copy.deepcopy(good)
    change(data)
    return data


BAD = {
    "an absolute path": (lambda d: d["files"].update({"/tmp/evil.txt": "x"}), "an absolute path"),
    "a path with ..": (lambda d: d["files"].update({"../outside.txt": "x"}), "not a plain relative path"),
    "a declared out reached through ..": (
        lambda d: d["files"].update({"reports/../reports/train_history.csv": "x"}), "not a plain relative path"),
    "dvc.yaml": (lambda d: d["files"].update({"dvc.yaml": "stages: {}"}), "not an output of stage 'train'"),
    "another stage's output": (lambda d: d["files"].update({"reports/metrics.json": "{}"}), "not an output"),
    "another stage's lock entry": (
        lambda d: d["lock"].update({"register": {"cmd": "x"}}), "lock entry for stage 'register'"),
    "a lock out that dvc.yaml does not declare": (
        lambda d: d["lock"]["train"]["outs"].append({"path": "dvc.yaml", "md5": "2" * 32}), "out 'dvc.yaml'"),
    "a lock entry with another cmd": (
        lambda d: d["lock"]["train"].update({"cmd": "rm -rf ~"}), "cmd 'rm -rf ~' is not dvc.yaml's"),
    "non-text content": (lambda d: d["files"].update({"reports/train_history.csv": 3}), "not text"),
    "an unexpected key": (lambda d: d.update({"run": "curl evil | sh"}), "unexpected key 'run'"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_a_handoff_naming_anything_else_is_refused_and_nothing_is_written(repo, good, case):
    change, expected = BAD[case]
    before = _snapshot(repo)
    with pytest.raises(dvcrun.HandoffRefused) as err:
        dvcrun.adopt(repo, _bad(good, change))
    msg = str(err.value)
    assert expected in msg and "nothing was written" in msg
    assert _snapshot(repo) == before  # not even the hand-off's good files or lock entry
    assert not (repo.parent / "outside.txt").exists() and not Path("/tmp/evil.txt").exists()


def test_every_problem_is_listed_at_once(repo, good):
    data = _bad(good, lambda d: d["files"].update({"/etc/x": "x", "../y": "y"}))
    with pytest.raises(dvcrun.HandoffRefused, match=r"2 problem\(s\)"):
        dvcrun.adopt(repo, data)


def test_a_declared_output_that_is_a_symlink_out_of_the_checkout_is_refused(good, tmp_path):
    target = copy_project(tmp_path / "linked")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    os.symlink(outside, target / "reports")
    with pytest.raises(dvcrun.HandoffRefused, match="leads out of"):
        dvcrun.adopt(target, good)
    assert list(outside.iterdir()) == [] and not (target / "dvc.lock").exists()


def test_upstream_lock_entries_are_checked_on_the_worker(repo, good):
    with pytest.raises(dvcrun.HandoffRefused, match="only download come from upstream"):
        dvcrun.check_upstream(repo, {"train": good["lock"]["train"]}, ["download"])


def test_a_deployment_run_refuses_a_checkout_that_moved_off_the_pinned_commit(repo, monkeypatch):
    head = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    pinned = SimpleNamespace(id="d", name="vae-pipeline", version=head)
    monkeypatch.setattr(flows, "deployment", pinned)
    flows.check_pinned_commit(repo)  # at the pinned commit: runs
    monkeypatch.setattr(flows, "deployment", SimpleNamespace(id="d", name="vae-pipeline", version="f" * 40))
    with pytest.raises(flows.SourceMoved, match="pinned to commit f{40}, but .* is at " + head):
        flows.check_pinned_commit(repo)
    monkeypatch.setattr(flows, "deployment", SimpleNamespace(id=None, name=None, version=None))
    flows.check_pinned_commit(repo)  # not a deployment run (make flow, tests): nothing to check


def test_the_flows_take_no_root_parameter():
    from prefect.utilities.callables import parameter_schema

    for flow in (flows.vae_pipeline, flows.vae_train):
        assert "root" not in parameter_schema(flow.fn).properties
