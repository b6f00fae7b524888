"""`make services` for real: PostgreSQL, MLflow (basic auth) and Prefect (auth string), and the pipeline on them.

One stack serves the module: `python -m pipeline.services start` (what `make services`
runs) in a fresh folder on free ports, stopped and removed at the end. The tests
read what a user or another tool sees: the servers' REST APIs and PostgreSQL.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import psutil
import psycopg
import pytest
import requests

from tests.support.e2e import copy_project, dvc, run, tool_env
from tests.support.mlflow_store import MlflowRestReads, free_port
from tests.support.project import ROOT

pytestmark = pytest.mark.slow

CLIENT_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
               "PREFECT_API_URL", "PREFECT_API_AUTH_STRING")  # fmt: skip
EPOCHS = 2
KILL_EPOCHS = 40  # long enough to kill a server mid-training
KILL_PARAMS = {"train.epochs": KILL_EPOCHS, "train.image_every": 10}
MODEL = "vae-mnist"


class Stack(MlflowRestReads):
    """The running services as a client sees them: their exports, REST APIs and database."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder, self.env = folder, env
        self.exports: dict[str, str] = {}

    def cli(self, command: str, check: bool = True) -> subprocess.CompletedProcess:
        """`python -m pipeline.services <command>`, exactly what `make services` / `services-stop` run."""
        proc = subprocess.run([sys.executable, "-m", "pipeline.services", command], cwd=ROOT, env=self.env,
                              capture_output=True, text=True, timeout=900)  # fmt: skip
        if check and proc.returncode != 0:
            raise AssertionError(f"services {command} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def start(self) -> subprocess.CompletedProcess:
        proc = self.cli("start")
        self.exports = parse_exports(proc.stdout)
        return proc

    def credentials(self) -> dict[str, str]:
        lines = (self.folder / "credentials.env").read_text().splitlines()
        return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))

    def pid(self, name: str) -> int:
        if name == "postgres":
            return int((self.folder / "postgres" / "postmaster.pid").read_text().split()[0])
        return int((self.folder / f"{name}.pid").read_text())

    def client_env(self, **extra: str) -> dict[str, str]:
        return tool_env(**self.exports, **extra)

    # MLflow's REST API, with the exported credentials

    @property
    def mlflow_auth(self) -> tuple[str, str]:
        return self.exports["MLFLOW_TRACKING_USERNAME"], self.exports["MLFLOW_TRACKING_PASSWORD"]

    def mlflow(self, method: str, endpoint: str, **kwargs) -> dict:
        url = f"{self.exports['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/{endpoint}"
        resp = requests.request(method, url, auth=self.mlflow_auth, timeout=60, **kwargs)
        resp.raise_for_status()
        return resp.json()

    api = mlflow  # what MlflowRestReads calls

    def runs(self) -> list[dict]:
        """Every run of the pipeline's experiment, oldest first; none before the first run created it."""
        url = f"{self.exports['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/experiments/get-by-name"
        resp = requests.get(url, params={"experiment_name": MODEL}, auth=self.mlflow_auth, timeout=60)
        if resp.status_code == 404:
            return []
        resp.raise_for_status()
        exp = resp.json()["experiment"]
        return self.runs_of(exp["experiment_id"])

    def run(self, run_id: str) -> dict:
        return next(r for r in self.runs() if r["info"]["run_id"] == run_id)

    def champion(self) -> dict:
        return self.mlflow("GET", "registered-models/alias", params={"name": MODEL, "alias": "champion"})[
            "model_version"
        ]

    def versions(self) -> list[str]:
        found = self.mlflow("GET", "model-versions/search", params={"filter": f"name='{MODEL}'"})
        return sorted(v["version"] for v in found.get("model_versions", []))

    # Prefect's REST API and its tables in PostgreSQL

    def prefect(self, endpoint: str, body: dict | None = None) -> list | dict:
        user, _, password = self.exports["PREFECT_API_AUTH_STRING"].partition(":")
        resp = requests.post(f"{self.exports['PREFECT_API_URL']}/{endpoint}", json=body or {},
                             auth=(user, password), timeout=60)  # fmt: skip
        resp.raise_for_status()
        return resp.json()

    def sql(self, database: str, query: str) -> list[tuple]:
        port = int(self.env["VAE_PG_PORT"])
        with psycopg.connect(host="127.0.0.1", port=port, user="vae", dbname=database,
                             password=self.credentials()["VAE_PG_PASSWORD"]) as conn:  # fmt: skip
            return conn.execute(query).fetchall()


def parse_exports(stdout: str) -> dict[str, str]:
    """`export NAME=value` lines, read the way a shell's `eval` reads them."""
    found = {}
    for line in stdout.splitlines():
        words = shlex.split(line)
        assert words[0] == "export" and len(words) == 2, line
        name, _, value = words[1].partition("=")
        found[name] = value
    return found


@pytest.fixture(scope="module")
def stack(tiny_mirror):
    # The folder must be enterable by the `postgres` account (pytest's tmp folders are 0700).
    folder = Path(tempfile.mkdtemp(prefix="vae-services-"))
    folder.chmod(0o755)
    env = {k: v for k, v in tool_env().items() if k not in CLIENT_VARS}
    env.update(VAE_SERVICES_DIR=str(folder / "svc"), VAE_PG_PORT=str(free_port()),
               VAE_MLFLOW_PORT=str(free_port()), VAE_PREFECT_PORT=str(free_port()))  # fmt: skip
    services = Stack(folder / "svc", env)
    try:
        services.start()
        yield services
    finally:
        services.cli("stop", check=False)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def pipeline_run(stack, tiny_mirror, tmp_path_factory):
    """`dvc repro` of a tiny project against the stack, then its Prefect flow (`make flow`) with latent_dim 3."""
    repo = copy_project(tmp_path_factory.mktemp("services-repo") / "repo", **{"train.epochs": EPOCHS})
    env = stack.client_env(VAE_DATA_MIRROR=f"file://{tiny_mirror}")
    repro = dvc("repro", cwd=repo, env=env)
    flow = run([sys.executable, "-m", "pipeline.flows", "-S", "model.latent_dim=3"], repo, env)
    return repo, env, repro, flow


# ---------------------------------------------------------------- the stack itself


def test_start_prints_the_exports_a_shell_needs(stack):
    assert set(stack.exports) == set(CLIENT_VARS)
    assert stack.exports["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{stack.env['VAE_MLFLOW_PORT']}"
    assert stack.exports["PREFECT_API_URL"] == f"http://127.0.0.1:{stack.env['VAE_PREFECT_PORT']}/api"
    creds = stack.credentials()
    assert stack.exports["MLFLOW_TRACKING_PASSWORD"] == creds["MLFLOW_TRACKING_PASSWORD"]
    assert (stack.folder / "credentials.env").stat().st_mode & 0o777 == 0o600


def test_requests_without_credentials_get_401_from_both_servers(stack):
    mlflow = f"{stack.exports['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/experiments/search?max_results=1"
    prefect = f"{stack.exports['PREFECT_API_URL']}/flows/filter"
    assert requests.get(mlflow, timeout=30).status_code == 401
    assert requests.get(mlflow, auth=("admin", "wrong"), timeout=30).status_code == 401
    assert requests.post(prefect, json={}, timeout=30).status_code == 401
    assert requests.post(prefect, json={}, auth=("admin", "wrong"), timeout=30).status_code == 401
    assert requests.get(mlflow, auth=stack.mlflow_auth, timeout=30).status_code == 200
    assert isinstance(stack.prefect("flows/filter"), list)


def test_every_server_listens_on_127_0_0_1_only(stack):
    for var in ("VAE_PG_PORT", "VAE_MLFLOW_PORT", "VAE_PREFECT_PORT"):
        port = int(stack.env[var])
        listening = {c.laddr.ip for c in psutil.net_connections("inet")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port}  # fmt: skip
        assert listening == {"127.0.0.1"}, var


def test_a_second_start_finds_the_stack_running_and_prints_the_same_exports(stack):
    pids = {name: stack.pid(name) for name in ("postgres", "mlflow", "prefect")}
    exports = dict(stack.exports)
    began = time.monotonic()
    stack.start()
    assert stack.exports == exports
    assert {name: stack.pid(name) for name in pids} == pids  # nothing restarted
    assert time.monotonic() - began < 60
    assert stack.cli("status").stdout.split() == ["postgres:", "up", "mlflow:", "up", "prefect:", "up"]


def test_a_port_that_is_not_a_number_is_a_clear_error(stack):
    proc = subprocess.run([sys.executable, "-m", "pipeline.services", "start"], cwd=ROOT, capture_output=True,
                          text=True, env={**stack.env, "VAE_MLFLOW_PORT": "fifty"}, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == ""
    assert "VAE_MLFLOW_PORT='fifty' is not a port number" in proc.stderr and "Traceback" not in proc.stderr


def test_a_service_that_cannot_start_is_a_clear_error_naming_its_log(stack):
    other = stack.folder.parent / "other"  # a second stack whose PostgreSQL port is taken (by our MLflow)
    env = {**stack.env, "VAE_SERVICES_DIR": str(other), "VAE_PG_PORT": stack.env["VAE_MLFLOW_PORT"]}
    proc = subprocess.run([sys.executable, "-m", "pipeline.services", "start"], cwd=ROOT, capture_output=True,
                          text=True, env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    port = stack.env["VAE_MLFLOW_PORT"]
    assert f"error: PostgreSQL did not start on 127.0.0.1:{port}; read {other / 'logs' / 'postgres.log'}" in proc.stderr
    assert "Address already in use" in (other / "logs" / "postgres.log").read_text()


# ---------------------------------------------------------------- the pipeline on the stack, auth on


def test_dvc_repro_logs_every_epoch_and_picture_and_registers_the_champion(stack, pipeline_run):
    repo, _, _, _ = pipeline_run
    run_id = json.loads((repo / "reports" / "mlflow_run.json").read_text())["run_id"]
    first = stack.runs()[0]
    assert first["info"]["status"] == "FINISHED" and first["data"]["params"]["model.latent_dim"] == "4"
    for key in ("train/loss", "val/loss", "train/kl"):
        assert stack.metric_steps(first["info"]["run_id"], key) == list(range(1, EPOCHS + 1)), key
    assert "test.nll_iwae" in first["data"]["metrics"]
    images = stack.artifacts(first["info"]["run_id"], "images")
    assert any(re.fullmatch(r"images/train~samples\+step\+1\+.*\.png", p) for p in images), images
    assert "evaluate/latent_map.png" in stack.artifacts(first["info"]["run_id"], "evaluate")
    champion = stack.champion()
    assert champion["run_id"] in {r["info"]["run_id"] for r in stack.runs()}
    assert run_id == stack.runs()[-1]["info"]["run_id"]  # the flow's run is the last one


def test_make_flow_completes_and_postgres_holds_the_completed_flow_run(stack, pipeline_run):
    rows = stack.sql("prefect", "SELECT fr.state_type FROM flow_run fr JOIN flow f ON f.id = fr.flow_id "
                                "WHERE f.name = 'vae-pipeline'")  # fmt: skip
    assert [state for (state,) in rows] == ["COMPLETED"]
    runs = stack.runs()
    assert [r["data"]["params"]["model.latent_dim"] for r in runs] == ["4", "3"]
    assert all(r["info"]["status"] == "FINISHED" for r in runs)


def test_no_credential_reaches_params_tags_logs_or_flow_parameters(stack, pipeline_run):
    repo, _, repro, flow = pipeline_run
    secrets = [v for k, v in stack.credentials().items() if k != "MLFLOW_TRACKING_USERNAME"]
    flow_runs = stack.prefect("flow_runs/filter")
    seen = [repro.stdout, repro.stderr, flow.stdout, flow.stderr, (repo / "params.yaml").read_text(),
            json.dumps([r["data"] for r in stack.runs()]), json.dumps(flow_runs)]  # fmt: skip
    seen += [p.read_text(errors="replace") for p in (stack.folder / "logs").glob("*.log")]
    for secret in secrets:
        assert not any(secret in text for text in seen)


def test_runs_versions_aliases_and_flow_runs_survive_a_stop_and_start(stack, pipeline_run):
    before = ([r["info"]["run_id"] for r in stack.runs()], stack.versions(), stack.champion()["version"],
              [f["id"] for f in stack.prefect("flow_runs/filter")])  # fmt: skip
    stopped = stack.cli("stop")
    assert "stopped" in stopped.stderr
    assert stack.cli("status", check=False).returncode == 3
    for name in ("mlflow", "prefect"):
        assert not (stack.folder / f"{name}.pid").exists()
    stack.start()
    after = ([r["info"]["run_id"] for r in stack.runs()], stack.versions(), stack.champion()["version"],
             [f["id"] for f in stack.prefect("flow_runs/filter")])  # fmt: skip
    assert after == before and len(before[0]) == 2 and len(before[1]) == 2


# ---------------------------------------------------------------- faults


def _start_repro(repo: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([str(Path(sys.executable).parent / "dvc"), "repro"], cwd=repo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _kill_mid_training(
    stack: Stack, repo: Path, env: dict[str, str], runs_before: set[str], kill: Callable[[], None]
) -> tuple[int, str]:
    """Start `dvc repro`, call `kill` once a new run has an epoch logged; the run's exit code and output."""
    proc = _start_repro(repo, env)
    try:
        # the train stage writes mlflow_run.json only at its end: find the run through the server
        deadline = time.monotonic() + 300
        while not any(stack.metric_steps(r["info"]["run_id"], "train/loss") for r in stack.runs()
                      if r["info"]["run_id"] not in runs_before):  # fmt: skip
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.2)
        kill()
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, out


def test_mlflow_server_killed_mid_training_then_restarted_the_rerun_completes(stack, pipeline_run, tmp_path):
    _, env, _, _ = pipeline_run
    runs_before = {r["info"]["run_id"] for r in stack.runs()}
    repo = copy_project(tmp_path / "repo", **KILL_PARAMS)
    rc, out = _kill_mid_training(stack, repo, env, runs_before, lambda: os.killpg(stack.pid("mlflow"), signal.SIGKILL))
    assert rc != 0 and "error: lost the MLflow tracking store" in out and "Traceback" not in out, out

    stack.start()  # restarts the MLflow server only
    dvc("repro", cwd=repo, env=env)
    runs = stack.runs()
    assert runs_before <= {r["info"]["run_id"] for r in runs}  # nothing lost
    new_run = json.loads((repo / "reports" / "mlflow_run.json").read_text())["run_id"]
    assert stack.run(new_run)["info"]["status"] == "FINISHED"
    assert stack.metric_steps(new_run, "train/loss") == list(range(1, KILL_EPOCHS + 1))
    assert json.loads((repo / "reports" / "registration.json").read_text())["version"] in stack.versions()


def test_postgres_killed_mid_run_is_a_clear_error_and_after_a_restart_the_rerun_completes(
    stack, pipeline_run, tmp_path
):
    _, env, _, _ = pipeline_run
    runs_before = {r["info"]["run_id"] for r in stack.runs()}
    repo = copy_project(tmp_path / "repo", **KILL_PARAMS)
    rc, out = _kill_mid_training(stack, repo, env, runs_before, lambda: os.kill(stack.pid("postgres"), signal.SIGKILL))
    assert rc != 0 and "Traceback" not in out, out
    assert "error: lost the MLflow tracking store" in out and "rerun `dvc repro`" in out, out

    stack.start()  # restarts PostgreSQL; MLflow and Prefect reconnect
    dvc("repro", cwd=repo, env=env)
    new_run = json.loads((repo / "reports" / "mlflow_run.json").read_text())["run_id"]
    assert stack.run(new_run)["info"]["status"] == "FINISHED"
    assert stack.metric_steps(new_run, "train/loss") == list(range(1, KILL_EPOCHS + 1))
    assert runs_before <= {r["info"]["run_id"] for r in stack.runs()}


# ---------------------------------------------------------------- sweeps


def test_a_two_point_sweep_lands_every_experiment_in_the_server(stack, tiny_mirror, tmp_path):
    runs_before = {r["info"]["run_id"] for r in stack.runs()}
    repo = copy_project(tmp_path / "repo", **{"train.epochs": EPOCHS})
    env = stack.client_env(VAE_DATA_MIRROR=f"file://{tiny_mirror}")
    # what `make sweep GRID="model.latent_dim=2,3"` runs: queued DVC experiments in DVC's temporary copies
    out = run([sys.executable, "-m", "pipeline.sweep", "--jobs", "1", "model.latent_dim=2,3"], repo, env).stdout
    swept = dict(re.findall(r"^(\S+): (model\.latent_dim=\d)$", out, re.MULTILINE))
    assert sorted(swept.values()) == ["model.latent_dim=2", "model.latent_dim=3"], out
    new = [r for r in stack.runs() if r["info"]["run_id"] not in runs_before]
    assert sorted(r["info"]["run_name"] for r in new) == sorted(swept)
    for r in new:
        run_id, name = r["info"]["run_id"], r["info"]["run_name"]
        assert r["info"]["status"] == "FINISHED" and r["data"]["tags"]["dvc.experiment"] == name
        assert f"model.latent_dim={r['data']['params']['model.latent_dim']}" == swept[name]
        assert stack.metric_steps(run_id, "train/loss") == list(range(1, EPOCHS + 1))
        assert "test.nll_iwae" in r["data"]["metrics"] and "images" in stack.artifacts(run_id)
    registered = {v["run_id"] for v in stack.mlflow("GET", "model-versions/search",
                                                     params={"filter": f"name='{MODEL}'"})["model_versions"]}  # fmt: skip
    assert {r["info"]["run_id"] for r in new} <= registered
