"""Two `vae-pipeline` runs in one checkout: the second is refused before it touches anything."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline import flows


def test_a_second_pipeline_run_in_the_same_checkout_is_refused(tmp_path):
    (tmp_path / ".dvc").mkdir()
    holder = subprocess.Popen(  # another process holds the checkout, as a running flow would
        [sys.executable, "-c", "import sys, time; from pipeline import flows; "
         "from pathlib import Path\nwith flows.workspace_lock(Path(sys.argv[1])):\n print('held', flush=True); time.sleep(60)",
         str(tmp_path)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(flows.WorkspaceBusy, match="another vae-pipeline run is using"):
            with flows.workspace_lock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    with flows.workspace_lock(tmp_path):  # the lock dies with its holder: a rerun goes ahead
        pass
