"""Write-then-rename helpers, so a crash or a full disk never leaves half a file."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from vae_mlops.errors import VaeMlopsError


class WriteError(OSError, VaeMlopsError):
    """A file could not be written (disk full, quota, permissions); the previous one is intact."""


@contextlib.contextmanager
def _named_write_errors(target: Path) -> Iterator[None]:
    try:
        yield
    except WriteError:
        raise
    except OSError as exc:
        raise WriteError(
            exc.errno,
            f"could not write {target}: {exc.strerror or exc}. Free disk space (or fix permissions) and rerun; "
            f"the previous {target.name}, if any, is intact",
        ) from exc


def _umask() -> int:
    """The process umask (read by setting and restoring it: POSIX has no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it over `target` only on success."""
    target = Path(target)
    with _named_write_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
    tmp_path = Path(tmp)
    try:
        with _named_write_errors(target):
            yield tmp_path
            with open(tmp_path, "rb") as fh:
                os.fsync(fh.fileno())
            os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes it 0600; give what open() would
            os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_bytes(target: Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text(target: Path, text: str) -> None:
    write_bytes(target, text.encode())


def write_json(target: Path, obj: Any) -> None:
    write_text(target, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_with(target: Path, writer: Callable[[Path], None]) -> None:
    """Let `writer` fill a temporary path (torch.save, save_image, to_parquet), then rename."""
    with atomic_path(target) as tmp:
        writer(tmp)


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; swap it in only when the block succeeds."""
    target = Path(target)
    with _named_write_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700; give what mkdir() would
    try:
        with _named_write_errors(target):
            yield tmp
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            if target.exists():
                os.replace(target, old)
            try:
                os.replace(tmp, target)
            except OSError:
                if old.exists():
                    os.replace(old, target)  # put the previous version back
                raise
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
