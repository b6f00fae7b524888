"""`make services` for real: PostgreSQL, MLflow (basic auth) and Prefect (auth string), and the pipeline on them.

One stack serves the module: `python -m pipeline.services start` (what `make services`
runs) in a fresh 0700 folder on free ports, stopped and removed at the end. The tests
read what a user or another tool sees: the servers' REST APIs and PostgreSQL, and
attack it as another local account would (`runuser -u nobody`).
"""

from __future__ import annotations

import fcntl
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
from pipeline import services

pytestmark = pytest.mark.slow

CLIENT_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
               "VAE_SERVE_MLFLOW_USERNAME", "VAE_SERVE_MLFLOW_PASSWORD",
               "PREFECT_API_URL", "PREFECT_API_AUTH_STRING", "VAE_INFERENCE_DB_URI", "VAE_INFERENCE_DB_PASSWORD",
               "VAE_MONITOR_DB_URI", "VAE_MONITOR_DB_PASSWORD")  # fmt: skip
EPOCHS = 2
KILL_EPOCHS = 40  # long enough to kill a server mid-training
KILL_PARAMS = {"train.epochs": KILL_EPOCHS, "train.image_every": 10}
MODEL = "vae-mnist"
PLANTED = {"MLFLOW_TRACKING_PASSWORD": "planted-client-password", "AWS_SECRET_ACCESS_KEY": "planted-cloud-key"}


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

    @property
    def settings(self) -> services.Settings:
        return services.Settings.from_env(self.env)

    def pid(self, name: str) -> int:
        if name == "postgres":
            return int((self.settings.pgdata / "postmaster.pid").read_text().split()[0])
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

    def sql(self, database: str, query: str, user: str = "vae", secret: str = "VAE_PG_PASSWORD") -> list[tuple]:
        port = int(self.env["VAE_PG_PORT"])
        with psycopg.connect(host="127.0.0.1", port=port, user=user, dbname=database,
                             password=self.credentials()[secret]) as conn:  # fmt: skip
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


def remove_stack_folders(folder: Path) -> None:
    """The services folder and, as root, the cluster folder it had under the `postgres` account's home."""
    shutil.rmtree(services.Settings.from_env({"VAE_SERVICES_DIR": str(folder)}).pg_root, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def stack(tiny_mirror):
    # mkdtemp's folder is 0700: as root, the stack must not need the `postgres` account to enter it
    folder = Path(tempfile.mkdtemp(prefix="vae-services-"))
    env = {k: v for k, v in tool_env().items() if k not in CLIENT_VARS}
    env.update(PLANTED)  # a shell that has eval'd a stack's exports, and holds other secrets
    env.update(VAE_SERVICES_DIR=str(folder / "svc"), VAE_PG_PORT=str(free_port()),
               VAE_MLFLOW_PORT=str(free_port()), VAE_PREFECT_PORT=str(free_port()))  # fmt: skip
    running = Stack(folder / "svc", env)
    try:
        running.start()
        yield running
    finally:
        running.cli("stop", check=False)
        remove_stack_folders(folder / "svc")
        remove_stack_folders(folder / "other")
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
    # the pipeline writes as `pipeline`, the scoring server reads as `reader`; the admin's password stays in the file
    assert (stack.exports["MLFLOW_TRACKING_USERNAME"], stack.exports["MLFLOW_TRACKING_PASSWORD"]) == (
        "pipeline", creds["VAE_MLFLOW_WRITER_PASSWORD"])
    assert (stack.exports["VAE_SERVE_MLFLOW_USERNAME"], stack.exports["VAE_SERVE_MLFLOW_PASSWORD"]) == (
        "reader", creds["VAE_MLFLOW_READER_PASSWORD"])
    for secret in ("VAE_MLFLOW_ADMIN_PASSWORD", "VAE_PG_PASSWORD", "VAE_PG_MLFLOW_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert creds[secret] not in "".join(stack.exports.values()), secret
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


# ---------------------------------------------------------------- least privilege, attacked


def as_nobody(url: str, method: str = "GET", body: str | None = None, auth: str | None = None) -> int:
    """The HTTP status another local account gets (curl run as `nobody`)."""
    if os.geteuid() != 0 or shutil.which("runuser") is None or shutil.which("curl") is None:
        pytest.skip("needs root, runuser and curl to act as another account")
    cmd = ["runuser", "-u", "nobody", "--", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", method]
    cmd += ["-H", "Content-Type: application/json", "-d", body] if body is not None else []
    cmd += ["-u", auth] if auth is not None else []
    return int(subprocess.run([*cmd, url], capture_output=True, text=True, timeout=60, cwd="/").stdout)


def test_another_account_gets_401_from_every_server_and_cannot_read_the_folder(stack):
    mlflow, prefect = stack.exports["MLFLOW_TRACKING_URI"], stack.exports["PREFECT_API_URL"]
    api = f"{mlflow}/api/2.0/mlflow"
    for method, url, body in [
        ("GET", f"{api}/experiments/search?max_results=1", None),
        ("POST", f"{api}/registered-models/create", '{"name": "vae-mnist"}'),
        ("POST", f"{api}/users/create", '{"username": "me", "password": "mine-mine-mine"}'),
        ("GET", f"{mlflow}/api/2.0/mlflow-artifacts/artifacts", None),
        ("POST", f"{prefect}/flows/filter", "{}"),
        ("POST", f"{prefect}/deployments/", '{"name": "evil", "flow_id": "00000000-0000-0000-0000-000000000000"}'),
    ]:
        assert as_nobody(url, method, body) == 401, url
        assert as_nobody(url, method, body, auth="admin:guess") == 401, url
    denied = subprocess.run(["runuser", "-u", "nobody", "--", "cat", str(stack.folder / "credentials.env")],
                            capture_output=True, text=True, cwd="/")  # fmt: skip
    assert denied.returncode != 0 and "Permission denied" in denied.stderr


def test_the_postmaster_environment_holds_no_secret(stack):
    environ = Path(f"/proc/{stack.pid('postgres')}/environ").read_bytes().decode(errors="replace")
    for name, secret in [*stack.credentials().items(), *PLANTED.items()]:
        assert secret not in environ, name
    names = {pair.split("=", 1)[0] for pair in environ.split("\0") if pair}
    assert not {n for n in names if n.startswith(("MLFLOW_", "PREFECT_")) or n == "PGPASSWORD"}, names
    if os.geteuid() == 0:  # PostgreSQL never runs as root; its cluster lives where its own account can enter
        assert psutil.Process(stack.pid("postgres")).username() == "postgres"
        assert stack.settings.pgdata.stat().st_uid == services.pwd.getpwnam("postgres").pw_uid


def test_mlflow_and_prefect_use_roles_that_own_only_their_databases(stack):
    roles = dict(stack.sql("postgres", "SELECT rolname, rolsuper OR rolcreatedb OR rolcreaterole FROM pg_roles "
                                       "WHERE rolname IN ('mlflow', 'prefect')"))  # fmt: skip
    assert roles == {"mlflow": False, "prefect": False}
    owners = dict(stack.sql("postgres", "SELECT datname, pg_get_userbyid(datdba) FROM pg_database "
                                        "WHERE datname IN ('mlflow', 'mlflow_auth', 'prefect')"))  # fmt: skip
    assert owners == {"mlflow": "mlflow", "mlflow_auth": "mlflow", "prefect": "prefect"}
    assert stack.sql("mlflow", "SELECT count(*) FROM experiments", "mlflow", "VAE_PG_MLFLOW_PASSWORD")[0][0] >= 1
    with pytest.raises(psycopg.OperationalError, match="permission denied"):
        stack.sql("prefect", "SELECT 1", "mlflow", "VAE_PG_MLFLOW_PASSWORD")
    with pytest.raises(psycopg.OperationalError, match="permission denied"):
        stack.sql("mlflow", "SELECT 1", "prefect", "VAE_PG_PREFECT_PASSWORD")


def test_the_reader_reads_but_cannot_create_a_name_or_write(stack):
    api = f"{stack.exports['MLFLOW_TRACKING_URI']}/api/2.0/mlflow"
    reader = (stack.exports["VAE_SERVE_MLFLOW_USERNAME"], stack.exports["VAE_SERVE_MLFLOW_PASSWORD"])
    assert requests.get(f"{api}/experiments/search?max_results=1", auth=reader, timeout=30).status_code == 200
    for endpoint, body in (("registered-models/create", {"name": "vae-mnist-squatted"}),
                           ("experiments/create", {"name": "squatted"}),
                           ("users/create", {"username": "mine", "password": "mine-mine-mine"})):  # fmt: skip
        resp = requests.post(f"{api}/{endpoint}", json=body, auth=reader, timeout=30)
        assert resp.status_code == 403, (endpoint, resp.text)
    names = [m["name"] for m in stack.mlflow("GET", "registered-models/search").get("registered_models", [])]
    assert "vae-mnist-squatted" not in names
    made = stack.mlflow("POST", "experiments/create", json={"name": "written-by-the-pipeline"})["experiment_id"]
    resp = requests.post(f"{api}/experiments/update", json={"experiment_id": made, "new_name": "renamed"},
                         auth=reader, timeout=30)  # fmt: skip
    assert resp.status_code == 403


def test_the_scoring_server_may_only_insert_recorded_images_and_the_monitor_only_read_them(stack, monkeypatch):
    import numpy as np
    import sqlalchemy as sa

    from vae_mlops import inference_log

    for key in ("VAE_INFERENCE_DB_URI", "VAE_INFERENCE_DB_PASSWORD", "VAE_MONITOR_DB_URI", "VAE_MONITOR_DB_PASSWORD"):
        monkeypatch.setenv(key, stack.exports[key])
    assert "password" not in stack.exports["VAE_INFERENCE_DB_URI"].lower()  # the secret travels apart from the URL
    rec = inference_log.Recorder(inference_log.writer_url(), log_inputs=True, flush_s=0.1)
    images = np.random.default_rng(0).random((3, 784), dtype=np.float32)
    rec.record(None, images, model_name=MODEL, version="1", elbo=np.full(3, -100.0), mu=np.zeros((3, 2), np.float32))
    assert rec.flush(10) and rec.written == 3
    rec.close()
    rows = inference_log.read_since(inference_log.reader_url())
    assert len(rows) >= 3 and set(rows["version"]) >= {"1"}
    writer = inference_log.make_engine(inference_log.writer_url())
    reader = inference_log.make_engine(inference_log.reader_url(), inference_log.ENV_READER_PASSWORD)
    for engine, statement in ((writer, f"SELECT count(*) FROM {inference_log.TABLE_NAME}"),
                              (reader, f"DELETE FROM {inference_log.TABLE_NAME}")):  # fmt: skip
        with pytest.raises(sa.exc.ProgrammingError, match="permission denied"), engine.connect() as conn:
            conn.execute(sa.text(statement))
    writer.dispose()
    reader.dispose()


def test_the_folder_logs_and_artifacts_are_private(stack, pipeline_run):
    for folder in (stack.folder, stack.folder / "logs", stack.folder / "mlartifacts"):
        assert folder.stat().st_mode & 0o777 == 0o700, folder
    written = [p for p in (stack.folder / "mlartifacts").rglob("*")] + list((stack.folder / "logs").iterdir())
    assert written and all(p.stat().st_mode & 0o077 == 0 for p in written), [
        (str(p), oct(p.stat().st_mode)) for p in written if p.stat().st_mode & 0o077]


def test_a_services_folder_of_another_account_is_refused(stack, tmp_path):
    theirs = stack.folder.parent / "theirs"
    theirs.mkdir(mode=0o777)
    os.chown(theirs, 65534, 65534)  # nobody's
    proc = subprocess.run([sys.executable, "-m", "pipeline.services", "start"], cwd=ROOT, capture_output=True,
                          text=True, env={**stack.env, "VAE_SERVICES_DIR": str(theirs)}, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and "belongs to uid 65534, not to this account" in proc.stderr, proc.stderr
    assert list(theirs.iterdir()) == []


def test_a_second_start_while_one_runs_waits_for_it(stack):
    fd = os.open(stack.folder / "services.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a `make services` that is still starting holds it
    try:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.services", "start"], cwd=ROOT, env=stack.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        time.sleep(8)
        assert proc.poll() is None  # waiting its turn
    finally:
        os.close(fd)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "another `make services` is using" in err, err
    assert parse_exports(out) == stack.exports


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
    secrets = list(stack.credentials().values())
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
