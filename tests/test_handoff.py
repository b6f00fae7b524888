"""The worker hand-off: only the train stage's declared outputs and lock entry are adopted; anything else writes nothing."""

from __future__ import annotations

import copy
import hashlib
import json
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


RUN_FILE = "reports/mlflow_run.json"
HISTORY = "reports/train_history.csv"


def _out(path: str, kind: str, text: str | None = None) -> dict:
    """A lock entry's out as DVC 3 writes it: a file's md5 and size, or a folder's `.dir` md5 and file count."""
    if kind == "folder":
        return {"path": path, "hash": "md5", "md5": "2" * 32 + ".dir", "size": 10, "nfiles": 2}
    data = (text or "binary").encode()
    return {"path": path, "hash": "md5", "md5": hashlib.md5(data).hexdigest(), "size": len(data)}


def _entry(repo: Path, files: dict[str, str]) -> dict:
    declared = dvcrun._stage_paths(repo, dvcrun.TRAIN)
    kinds = dvcrun.train_outputs(repo)
    return {
        "cmd": declared["cmd"],
        "deps": [{"path": d, "hash": "md5", "md5": "0" * 32, "size": 1} for d in sorted(declared["deps"])],
        "params": copy.deepcopy(declared["params"]),
        "outs": [_out(o, kinds[o], files.get(o)) for o, _ in declared["outs"]],
    }


@pytest.fixture(scope="module")
def good(repo) -> dict:
    """A hand-off as a worker that trained with this checkout's dvc.yaml and params.yaml sends it."""
    experiment = yaml.safe_load((repo / "params.yaml").read_text())["mlflow"]["experiment"]
    run = {"run_id": "a" * 32, "experiment_id": "1", "tracking_uri": "http://127.0.0.1:5001", "experiment": experiment}
    files = {HISTORY: "epoch,train_loss\n1,0.5\n", RUN_FILE: json.dumps(run)}
    return {"lock": {dvcrun.TRAIN: _entry(repo, files)}, "files": files}


def _set_file(d: dict, rel: str, text: str) -> None:
    """Change a handed-off file and its lock entry's md5 and size together, as a worker that lies would."""
    d["files"][rel] = text
    out = next(o for o in d["lock"]["train"]["outs"] if o["path"] == rel)
    out.update(md5=hashlib.md5(text.encode()).hexdigest(), size=len(text.encode()))


def _out_of(d: dict, rel: str) -> dict:
    return next(o for o in d["lock"]["train"]["outs"] if o["path"] == rel)


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
    # text for what train writes as a binary file or a folder
    "text for the model file": (lambda d: _set_file(d, "models/vae.pt", "not weights"), "writes it as a binary"),
    "text for the checkpoints folder": (lambda d: d["files"].update({"models/checkpoints": "x"}), "writes it as a binary"),
    # files that differ from what the lock entry records
    "a file that is not the one the lock records": (
        lambda d: d["files"].update({HISTORY: "epoch\n9\n"}), "not the file the lock entry records"),
    "mlflow_run.json naming another experiment": (
        lambda d: _set_file(d, RUN_FILE, json.dumps({**json.loads(d["files"][RUN_FILE]), "experiment": "other"})),
        "names experiment 'other'"),
    "mlflow_run.json that is not a run record": (
        lambda d: _set_file(d, RUN_FILE, '{"run_id": "../../x"}'), "not what train writes there"),
    # every field of the lock entry
    "params the checkout does not have": (
        lambda d: d["lock"]["train"]["params"]["params.yaml"]["train"].update({"epochs": 999}), "param 'train'"),
    "a params entry naming another file": (
        lambda d: d["lock"]["train"]["params"].update({"/etc/passwd": {}}), "params must hold params.yaml only"),
    "an undeclared param key": (
        lambda d: d["lock"]["train"]["params"]["params.yaml"].update({"register": {}}), "param 'register'"),
    "a folder out recorded as a file": (
        lambda d: _out_of(d, "models/checkpoints").update(md5="3" * 32, nfiles=None), "recorded as a file"),
    "a file out recorded as a folder": (
        lambda d: _out_of(d, "models/vae.pt").update(md5="3" * 32 + ".dir", nfiles=1), "recorded as a folder"),
    "a malformed md5": (lambda d: _out_of(d, "models/vae.pt").update(md5="$(reboot)"), "is not an md5"),
    "a negative size": (lambda d: _out_of(d, "models/vae.pt").update(size=-1), "is not a byte count"),
    "a hash other than md5": (lambda d: _out_of(d, "models/vae.pt").update(hash="none"), "is not md5"),
    "an extra key in an out": (lambda d: _out_of(d, "models/vae.pt").update(remote="evil"), "unexpected key 'remote'"),
    "a missing out": (lambda d: d["lock"]["train"]["outs"].pop(0), "is missing"),
    "an out listed twice": (
        lambda d: d["lock"]["train"]["outs"].append(dict(d["lock"]["train"]["outs"][0])), "is listed twice"),
    "a path that is a list": (lambda d: d["lock"]["train"]["deps"].append({"path": ["a"]}), "dep ['a'] is not declared"),
    "a path that is an object": (lambda d: d["lock"]["train"]["outs"].append({"path": {"a": 1}}), "is not declared"),
    "outs that are not a list": (lambda d: d["lock"]["train"].update(outs={"models/vae.pt": {}}), "outs is not a list"),
    "frozen that is not a boolean": (lambda d: d["lock"]["train"].update(frozen="yes"), "frozen is not true or false"),
    "a stage md5 that is not an md5": (lambda d: d["lock"]["train"].update(md5=1), "md5 1 is not an md5"),
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


def test_a_handed_off_file_where_the_checkout_has_a_folder_is_refused(good, tmp_path):
    target = copy_project(tmp_path / "folder")
    (target / HISTORY).mkdir(parents=True)  # once raised IsADirectoryError half-way through adopting
    with pytest.raises(dvcrun.HandoffRefused, match="a folder in this checkout"):
        dvcrun.adopt(target, good)
    assert (target / HISTORY).is_dir() and not (target / "dvc.lock").exists()


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
