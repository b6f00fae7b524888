"""The README works as written: its cheap code blocks run in a clean shell, its links point at files that exist.

Every ```bash block of README.md carries a marker: `<!-- readme-test: run -->` (this test runs it, in
order, in a fresh copy of the project, from a shell with no venv activated and a minimal environment) or
`<!-- readme-test: skip: why -->` (servers that run until stopped, the test suite itself, long trainings).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.e2e import copy_project
from tests.support.project import ROOT

README = ROOT / "README.md"
MARKED = re.compile(r"<!-- readme-test: (run|skip: [^>]+) -->\n```bash\n(.*?)```", re.S)


def blocks() -> list[tuple[str, str]]:
    """(marker, code) of every marked bash block, in order."""
    return [(m.group(1), m.group(2)) for m in MARKED.finditer(README.read_text())]


def test_every_bash_block_says_whether_it_is_run():
    text = README.read_text()
    assert text.count("```bash\n") == len(blocks()), "a ```bash block of README.md has no readme-test marker"
    assert any(marker == "run" for marker, _ in blocks())


def test_the_first_screen_has_the_two_commands_and_where_to_look():
    first = "\n".join(README.read_text().splitlines()[:45])
    for needed in ("make pipeline", "make test", "make ui", "dvc metrics show", "docs/compare.png"):
        assert needed in first, needed


def test_every_local_link_points_at_a_file():
    for doc in [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "BENCHMARKS.md"]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # a URL
            assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which does not exist"


def _clean_env(home: Path, project: Path, mirror: Path) -> dict[str, str]:
    """What a new user's login shell has: no venv, no project variables but the offline mirror (relative)."""
    return {
        "HOME": str(home),
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "VAE_OFFLINE": "1",
        "VAE_DATA_MIRROR": os.path.relpath(mirror, project),  # relative to where the commands run, as documented
        "VAE_EXTRA_DATASETS": os.environ["VAE_EXTRA_DATASETS"],  # the tiny dataset (tests only)
        "DVC_NO_ANALYTICS": "1",
    }


@pytest.mark.slow
def test_the_readme_blocks_run_as_written_in_a_clean_shell(tiny_mirror, tmp_path):
    project = copy_project(tmp_path / "project", store=False)  # the pipeline files and tiny params, a git repo
    for name in ("Makefile", "README.md", "requirements.txt", "pyproject.toml"):
        shutil.copy2(ROOT / name, project / name)
        if name != "Makefile":
            os.utime(project / name, (0, 0))  # older than .venv/.installed: `make setup` has nothing to do
    (project / ".venv").symlink_to(ROOT / ".venv")  # the environment `make setup` built, not rebuilt here
    home = tmp_path / "home"
    home.mkdir()
    (home / ".gitconfig").write_text("[user]\n\tname = New User\n\temail = new@localhost\n")  # the Requirements
    env = _clean_env(home, project, tiny_mirror)
    ran = 0
    for marker, code in blocks():
        if marker != "run":
            continue
        proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", code], cwd=project, env=env,
                              capture_output=True, text=True, timeout=900)  # fmt: skip
        output = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        assert proc.returncode == 0, f"README block failed ({proc.returncode}):\n{code}\n{output}"
        ran += 1
    assert ran >= 3
    assert (project / "reports" / "metrics.json").is_file() and (project / "reports" / "promotions.jsonl").is_file()
