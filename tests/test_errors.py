"""One base class for every known fault: the command lines report it in one message and exit 2."""

from __future__ import annotations

import errno
import importlib
import inspect
import pkgutil

import pytest

import pipeline
import vae_mlops
from vae_mlops import cli
from vae_mlops.atomic import WriteError
from vae_mlops.data import DataError
from vae_mlops.errors import VaeMlopsError

NOT_USER_FAULTS = {"ReplicasDiverged"}  # a bug in the data-parallel step: it keeps its traceback


def _error_classes() -> dict[str, type]:
    found = {}
    for package in (vae_mlops, pipeline):
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            if info.name.endswith(".__main__"):  # runs the command line when imported
                continue
            module = importlib.import_module(info.name)
            for name, obj in vars(module).items():
                if (inspect.isclass(obj) and issubclass(obj, Exception) and obj.__module__ == module.__name__
                        and not name.startswith("_")):  # fmt: skip
                    found[f"{module.__name__}.{name}"] = obj
    return found


def test_every_expected_error_is_a_vae_mlops_error():
    classes = _error_classes()
    assert len(classes) >= 10, sorted(classes)
    stray = [name for name, cls in classes.items()
             if not issubclass(cls, VaeMlopsError) and name.rsplit(".", 1)[1] not in NOT_USER_FAULTS]  # fmt: skip
    assert stray == []


def test_a_write_error_is_still_an_os_error_with_its_errno():
    exc = WriteError(errno.ENOSPC, "could not write x: no space")
    assert isinstance(exc, OSError) and isinstance(exc, VaeMlopsError) and exc.errno == errno.ENOSPC
    assert str(exc) == "[Errno 28] could not write x: no space"


def test_the_cli_reports_a_known_fault_in_one_line_and_exits_2(monkeypatch, capsys):
    def fail(args):
        raise DataError("mirror unreachable: set VAE_DATA_MIRROR")

    monkeypatch.setitem(cli.COMMANDS, "download", fail)
    assert cli.main(["download"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: mirror unreachable: set VAE_DATA_MIRROR"


def test_the_cli_keeps_the_traceback_of_a_bug(monkeypatch):
    def bug(args):
        raise KeyError("not a known fault")

    monkeypatch.setitem(cli.COMMANDS, "download", bug)
    with pytest.raises(KeyError):
        cli.main(["download"])
