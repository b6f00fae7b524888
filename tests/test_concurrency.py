"""Two registrations at once against a real `mlflow server` (no file lock there: the gate re-reads and settles).

Two processes, each with its own checkout's promotion log, register a model into the same server at the same
moment. Afterwards exactly one version holds `champion` (the better one, whichever came first), and the
registry's own tags hold both decisions, so `registry history --registry` shows the race from any machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.support.mlflow_store import mlflow_server
from tests.test_registry import workers
from vae_mlops import registry, tracking

pytestmark = pytest.mark.slow


def test_two_registrations_at_once_against_a_server_leave_one_champion_and_both_decisions(tmp_path):
    """The overlap is forced: both read "no champion" and decide, then the worse one's alias is written last."""
    with mlflow_server(tmp_path / "mlflow") as server:
        client = tracking.mlflow_client(server.url)
        experiment = tracking.ensure_experiment(client, "race", server.url)
        runs = [client.create_run(experiment).info.run_id for _ in range(2)]
        logs = [tmp_path / f"promotions-{i}.jsonl" for i in range(2)]
        # worker 0 (90, the better) sets its alias first, worker 1 (100) overwrites it: settling must repair that
        with workers(tmp_path, server.url, runs, ("90.0", "100.0"), logs, "race") as (procs, sync):
            (sync / "go").touch()
            outs = [p.communicate(timeout=300) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        assert all((sync / f"set-{i}").exists() for i in range(2)), "the workers did not meet at the barrier"
        reg = tracking.ModelRegistry("race", server.url)
        aliases = reg.aliases()
        history = registry.registry_history(reg)
    decisions = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]  # MLflow prints its own lines first
    assert sorted(d["value"] for d in history) == [90.0, 100.0]  # both decisions, in the registry's tags
    assert {d["version"] for d in history} == {d["version"] for d in decisions}
    by_version = {d["version"]: d for d in decisions}
    assert list(aliases).count("champion") == 1 and by_version[aliases["champion"]]["value"] == 90.0
    for i in range(2):  # each checkout's own log holds its own decision
        (line,) = (tmp_path / f"promotions-{i}.jsonl").read_text().splitlines()
        assert json.loads(line)["version"] == decisions[i]["version"]


def test_a_second_flow_run_in_the_same_checkout_is_refused_before_it_touches_params(tiny_mirror, tmp_path):
    """Two real `python -m pipeline.flows` in one checkout: the second fails, params.yaml keeps the first's values."""
    import os
    import signal

    from tests.support.e2e import copy_project, tool_env

    repo = copy_project(tmp_path / "repo", **{"train.epochs": 400, "train.image_every": 400})
    flow = [sys.executable, "-m", "pipeline.flows", "--root", str(repo)]

    def env(home: str) -> dict[str, str]:
        return tool_env(VAE_DATA_MIRROR=str(tiny_mirror), PREFECT_HOME=str(tmp_path / home),
                        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")  # two start at once on 2 cores

    first = subprocess.Popen(flow, cwd=repo, env=env("prefect-1"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while not any((repo / "models" / "checkpoints").rglob("epoch-*.pt")):  # the first is training
            assert first.poll() is None and time.monotonic() < deadline, first.stdout.read() if first.stdout else ""
            time.sleep(0.1)
        params, stat = (repo / "params.yaml").read_bytes(), (repo / "params.yaml").stat()
        second = subprocess.run([*flow, "--epochs", "3"], cwd=repo, env=env("prefect-2"), capture_output=True,
                                text=True, timeout=600)  # fmt: skip
        assert first.poll() is None, "the first run ended: raise its epochs"
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    text = second.stdout + second.stderr
    assert second.returncode != 0, text
    assert f"another vae-pipeline run is using {repo}; wait for it or cancel it" in text, text
    assert (repo / "params.yaml").read_bytes() == params  # not train.epochs: 3
    assert (repo / "params.yaml").stat().st_mtime_ns == stat.st_mtime_ns  # not even rewritten
