"""The Makefile does what it says: real values in `make help`, a `make clean` that keeps what git and the
promotion history hold, overrides passed on, old target names that still work, and prerequisites asked for
only by the targets that need them."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def make(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "--no-print-directory", *args], cwd=cwd, capture_output=True, text=True, timeout=120,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_help_shows_real_values_not_variable_names():
    out = make("help").stdout
    assert "make ui" in out and "127.0.0.1:5000" in out  # the default, set in the Makefile
    assert "$(" not in out


def test_flow_passes_each_override_as_dash_s():
    out = make("-n", "flow", "S=train.epochs=3 model.latent_dim=2").stdout
    assert "pipeline.flows -S 'train.epochs=3' -S 'model.latent_dim=2'" in out


@pytest.mark.parametrize("given, seen", [
    ("../shared/data/mnist", os.path.normpath(ROOT / "../shared/data/mnist")),  # make's abspath: no symlink resolved
    ("mirror", str(ROOT / "mirror")),
    ("/abs/mirror", "/abs/mirror"),
    ("file:///abs/mirror", "file:///abs/mirror"),
    ("https://example.org/mnist", "https://example.org/mnist"),
])  # fmt: skip
def test_a_relative_data_mirror_is_made_absolute_for_every_recipe(given, seen):
    """DVC's temporary copies (queued experiments, `make sweep`) then find it too: relative to where make ran."""
    show = ["--eval", 'show-mirror: ; @echo "$$VAE_DATA_MIRROR"', "show-mirror"]
    assert make(*show, f"VAE_DATA_MIRROR={given}").stdout.strip() == seen  # on the command line
    assert make(*show, env={"VAE_DATA_MIRROR": given}).stdout.strip() == seen  # exported


def test_the_old_names_still_work_and_say_the_new_one():
    for old, new in (("services", "stack"), ("services-stop", "stack-stop"), ("serve", "scheduler")):
        proc = make("-n", old)
        assert f"`make {new}`" in proc.stderr or f"make {new}" in proc.stdout, (old, proc.stdout, proc.stderr)


def test_pipeline_needs_neither_postgresql_nor_chromium():
    """`make pipeline` asks for Python, pip and git only: no apt-get, no sudo anywhere on its way."""
    plan = make("-n", "pipeline", "--always-make").stdout
    assert "apt-get" not in plan and "sudo" not in plan
    assert "apt-get" in make("-n", "--always-make", "test").stdout  # the suite installs what it needs itself


def _apt_need_makefile(folder: Path) -> Path:
    """A Makefile with the real `apt_need` macro and a target whose package is always missing."""
    text = (ROOT / "Makefile").read_text()
    macro = text[text.index("define apt_need") : text.index("endef", text.index("define apt_need")) + len("endef")]
    (folder / "Makefile").write_text(f"SHELL := /bin/bash\n{macro}\nneeds:\n\t$(call apt_need,false,somepkg,a test)\n")
    return folder


@pytest.mark.parametrize("has_apt, message", [
    (False, "somepkg is missing and this system has no apt-get: install somepkg yourself"),
    (True, "installing it needs root: ask an administrator to install somepkg"),
])  # fmt: skip
def test_a_missing_package_without_apt_or_root_is_a_clear_error(tmp_path, has_apt, message):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "sh", "env", "echo", "false"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    fakes = {"id": "echo 1000"}  # not root, whoever runs the tests; and no sudo on PATH
    if has_apt:
        fakes["apt-get"] = "exit 0"
    for name, body in fakes.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    proc = subprocess.run(
        [shutil.which("make"), "--no-print-directory", "needs"], cwd=_apt_need_makefile(tmp_path),
        capture_output=True, text=True, timeout=60, env={"PATH": str(bin_dir)},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "a test: installing Debian's somepkg" in proc.stderr and message in proc.stderr


@pytest.mark.slow
def test_clean_never_deletes_tracked_files_or_the_promotion_history(tmp_path):
    repo = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True, timeout=120)
    shutil.copy2(ROOT / "Makefile", repo / "Makefile")  # the Makefile as it is in the working tree
    tracked = subprocess.run(["git", "ls-files", "reports", "models"], cwd=repo, capture_output=True, text=True,
                             check=True).stdout.split()  # fmt: skip
    assert "reports/metrics.json" in tracked
    outputs = ["models/vae.pt", "models/checkpoints/key/epoch_0001.pt", "reports/compare.html",
               "reports/evaluate/latent.png", "reports/registration.json"]  # fmt: skip
    for rel in [*outputs, "reports/promotions.jsonl"]:
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text("x\n")
    proc = make("clean", cwd=repo)
    assert proc.returncode == 0, proc.stderr
    assert all((repo / rel).exists() for rel in tracked), [rel for rel in tracked if not (repo / rel).exists()]
    assert (repo / "reports/promotions.jsonl").read_text() == "x\n"
    assert not any((repo / rel).exists() for rel in outputs)
    status = subprocess.run(["git", "status", "--porcelain", "--", "reports", "models"], cwd=repo,
                            capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert status == ""  # nothing tracked was touched
