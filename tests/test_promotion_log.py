"""The promotion log and the checkpoint folder after a full disk or a kill: no torn line, no stale temporary.

A real file-size limit (RLIMIT_FSIZE, what a full disk does to a write: the kernel
writes what fits and fails the rest) cuts the append; a real SIGKILL cuts a
checkpoint write.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vae_mlops import atomic, checkpoint, cli, registry


def _decision(version: str, reason: str = "first version") -> registry.Decision:
    return registry.Decision(
        time=f"2026-01-01T00:00:0{version}+00:00", model_name="vae-mnist", version=version, alias="champion",
        decision="promoted", reason=reason, metric="test.nll_iwae", lower_is_better=True, value=100.0,
        champion_version=None, champion_value=None, dataset="tiny", data_hash="h" * 64, git_commit="c" * 40,
        run_id="r" * 32,
    )  # fmt: skip


class _Registry:
    """What `record` needs of a model registry: its name and tags on a version."""

    name = "vae-mnist"

    def set_tags(self, version: str, tags: dict) -> None:
        pass


def test_a_torn_tail_is_reported_and_the_whole_lines_are_read(tmp_path, caplog):
    log = tmp_path / "promotions.jsonl"
    whole = json.dumps(_decision("1").to_dict(), sort_keys=True)
    log.write_text(whole + "\n" + whole[: len(whole) // 2])
    with caplog.at_level(logging.WARNING):
        rows = registry.read_log(log)
    assert [r["version"] for r in rows] == ["1"]
    assert f"{log} line 2 is torn" in caplog.text


def test_history_prints_the_whole_lines_of_a_log_with_a_torn_tail(tmp_path, capsys):
    (tmp_path / "reports").mkdir()
    whole = json.dumps(_decision("1").to_dict(), sort_keys=True)
    (tmp_path / "reports" / "promotions.jsonl").write_text(whole + "\n" + whole[:40])
    assert cli.main(["registry", "history", "--root", str(tmp_path)]) == 0
    assert "first version" in capsys.readouterr().out


def test_an_append_after_a_torn_tail_starts_a_fresh_line(tmp_path):
    log = tmp_path / "promotions.jsonl"
    whole = json.dumps(_decision("1").to_dict(), sort_keys=True)
    log.write_text(whole + "\n" + whole[:40])  # an older writer's line cut by a full disk
    registry.record(_Registry(), _decision("2"), log)
    assert [r["version"] for r in registry.read_log(log)] == ["1", "2"]
    assert log.read_text().endswith("\n")


def test_an_append_cut_by_a_full_disk_leaves_no_partial_line(tmp_path):
    log = tmp_path / "promotions.jsonl"
    registry.record(_Registry(), _decision("1"), log)
    before = log.read_bytes()
    # The kernel writes what fits under the limit and refuses the rest: a short write.
    script = textwrap.dedent(f"""
        import resource, signal, sys
        from pathlib import Path
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from tests.test_promotion_log import _Registry, _decision
        from vae_mlops import registry
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({len(before) + 30}, resource.RLIM_INFINITY))
        try:
            registry.record(_Registry(), _decision("2", reason="x" * 500), Path({str(log)!r}))
        except registry.RegistryError as exc:
            print(exc)
            sys.exit(3)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert f"could not append to {log}" in proc.stdout and "Free disk space" in proc.stdout
    assert log.read_bytes() == before  # the partial line was taken back
    assert [r["version"] for r in registry.read_log(log)] == ["1"]


def test_temporaries_of_a_killed_checkpoint_write_are_removed_at_the_next_start(tmp_path):
    key = "k" * 16
    folder = checkpoint.run_dir(tmp_path, key)
    checkpoint.save_epoch(tmp_path, key, 1, {"epoch": 1})
    # a write killed between the temporary file and its rename (as `atomic` names them)
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from vae_mlops import atomic
        def killed(src, dst):
            os.kill(os.getpid(), signal.SIGKILL)
        os.replace = killed
        atomic.write_bytes(Path({str(folder / "epoch-0002.pt")!r}), b"0" * 4096)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    stale = [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert len(stale) == 1 and stale[0].stat().st_size == 4096
    (folder / "notes.tmp").write_text("not ours")  # only the temporaries of checkpoint writes go
    assert checkpoint.latest_good(tmp_path, key)["epoch"] == 1  # what a training's start calls
    assert sorted(p.name for p in folder.iterdir()) == ["epoch-0001.pt", "epoch-0001.pt.sha256", "notes.tmp"]


@pytest.mark.parametrize("name", ["epoch-0003.pt", "epoch-0003.pt.sha256"])
def test_the_temporaries_removed_are_named_as_atomic_names_them(tmp_path, name):
    with atomic.atomic_path(tmp_path / name) as tmp:
        assert checkpoint._TEMPORARY.match(tmp.name)
    assert not checkpoint._TEMPORARY.match(name) and not checkpoint._TEMPORARY.match(".notes.tmp")
