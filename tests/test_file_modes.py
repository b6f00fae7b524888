"""Files written through `atomic` get the mode the umask gives, as open() and mkdir() would, not mkstemp's 0600."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Iterator

import pytest

from vae_mlops import atomic


@pytest.fixture(params=[0o022, 0o002, 0o077])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_files_get_the_umask_mode_like_open(tmp_path: Path, umask: int) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what open() gives under this umask
    atomic.write_text(tmp_path / "a.txt", "x")
    atomic.write_json(tmp_path / "a.json", {"a": 1})
    atomic.write_with(tmp_path / "a.bin", lambda p: p.write_bytes(b"x"))
    for name in ("a.txt", "a.json", "a.bin"):
        assert _mode(tmp_path / name) == _mode(plain) == 0o666 & ~umask, name


def test_atomic_dirs_get_the_umask_mode_like_mkdir(tmp_path: Path, umask: int) -> None:
    (tmp_path / "plain").mkdir()
    with atomic.atomic_dir(tmp_path / "d") as tmp:
        (tmp / "f").write_text("x")
    assert _mode(tmp_path / "d") == _mode(tmp_path / "plain") == 0o777 & ~umask


def test_replacing_a_file_takes_the_umask_mode_not_the_old_one(tmp_path: Path, umask: int) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old")
    target.chmod(0o600)
    atomic.write_text(target, "new")
    assert target.read_text() == "new"
    assert _mode(target) == 0o666 & ~umask
