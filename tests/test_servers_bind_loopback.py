"""The servers the project starts listen on 127.0.0.1 only and ask for credentials: `make ui` and `make serve`'s Prefect.

Each is also attacked the way another local account would: `runuser -u nobody` with curl.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import requests

from tests.support.project import ROOT
from tests.support.mlflow_store import fresh_store
from tests.support.servers import wait_until_answers
from vae_mlops.ports import free_port

from pipeline import local_auth, serve

pytestmark = pytest.mark.slow

LOOPBACK = "127.0.0.1"


def as_nobody(url: str, method: str = "GET", body: str | None = None, auth: str | None = None) -> int:
    """The HTTP status another local account gets for `url` (curl run as `nobody`)."""
    if os.geteuid() != 0 or shutil.which("runuser") is None or shutil.which("curl") is None:
        pytest.skip("needs root, runuser and curl to act as another account")
    cmd = ["runuser", "-u", "nobody", "--", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", method]
    if body is not None:
        cmd += ["-H", "Content-Type: application/json", "-d", body]
    if auth is not None:
        cmd += ["-u", auth]
    return int(subprocess.run([*cmd, url], capture_output=True, text=True, timeout=60, cwd="/").stdout)


def listening_addresses(port: int) -> set[str]:
    """Every local address with a socket listening on `port` (0.0.0.0 or :: would mean every interface)."""
    return {
        c.laddr.ip
        for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
    }


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group this test started, then SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=20)
            return
        except subprocess.TimeoutExpired:
            continue


def test_make_ui_serves_the_mlflow_ui_on_loopback_only_and_asks_everyone_for_credentials(tmp_path):
    fresh_store(tmp_path)  # `make ui` opens ./mlflow.db: a migrated one starts in seconds
    port = free_port()
    venv = Path(sys.executable).parent.parent
    # `-o setup`: the venv exists; run the `ui` target's own recipe, as `make ui` would, from tmp_path.
    make = ["make", "--no-print-directory", "-f", str(ROOT / "Makefile"), "-o", "setup", "ui", f"UI_PORT={port}", f"VENV={venv}"]
    env = {k: v for k, v in os.environ.items() if k != "VAE_CREDENTIALS_DIR"}
    dry = subprocess.run([*make, "-n"], cwd=tmp_path, capture_output=True, text=True, check=True, env=env).stdout
    assert "python -m pipeline.ui" in dry and f"--store {tmp_path}/mlflow.db" in dry and f"--port {port}" in dry

    log = tmp_path / "ui.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(make, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env)  # fmt: skip
    try:
        wait_until_answers(f"http://{LOOPBACK}:{port}/health", proc, log)
        assert listening_addresses(port) == {LOOPBACK}
        _attack_the_ui(f"http://{LOOPBACK}:{port}", tmp_path / ".credentials", log)
    finally:
        stop_group(proc)
    assert not listening_addresses(port)


def _attack_the_ui(url: str, credentials: Path, log: Path) -> None:
    """Another account gets 401 everywhere; the admin gets in; a second account reads but cannot squat a name."""
    api = f"{url}/api/2.0/mlflow"
    assert credentials.stat().st_mode & 0o777 == 0o700
    assert (credentials / "local.env").stat().st_mode & 0o777 == 0o600
    password = local_auth.read_env_file(credentials / "local.env")["VAE_UI_ADMIN_PASSWORD"]
    assert password not in log.read_text() and str(credentials / "local.env") in log.read_text()
    attacks = [
        ("GET", f"{api}/experiments/search?max_results=1", None),
        ("POST", f"{api}/experiments/create", '{"name": "planted"}'),
        ("POST", f"{api}/registered-models/create", '{"name": "vae-mnist"}'),
        ("POST", f"{url}/ajax-api/2.0/mlflow/registered-models/create", '{"name": "vae-mnist"}'),
        ("POST", f"{api}/registered-models/alias", '{"name": "vae-mnist", "alias": "champion", "version": "1"}'),
    ]
    for method, target, body in attacks:
        assert as_nobody(target, method, body) == 401, target
        assert as_nobody(target, method, body, auth=f"admin:{password}x") == 401, target
    admin = ("admin", password)
    assert requests.get(f"{api}/experiments/search?max_results=1", auth=admin, timeout=30).status_code == 200
    made = requests.post(f"{api}/users/create", json={"username": "viewer", "password": "viewer-pass-123"},
                         auth=admin, timeout=30)  # fmt: skip
    assert made.status_code == 200, made.text
    viewer = "viewer:viewer-pass-123"
    assert as_nobody(f"{api}/experiments/search?max_results=1", auth=viewer) == 200  # reads
    for what in ("experiments", "registered-models"):
        assert as_nobody(f"{api}/{what}/create", "POST", '{"name": "squatted"}', auth=viewer) == 403, what
    squat = requests.post(f"{api}/registered-models/create", json={"name": "squatted"}, auth=("viewer", "viewer-pass-123"),
                          timeout=30)  # fmt: skip
    assert "may read but not create" in squat.text
    found = requests.get(f"{api}/registered-models/search", auth=admin, timeout=30).json()
    assert found.get("registered_models", []) == []


def test_the_local_prefect_server_of_make_serve_listens_on_loopback_only_and_asks_for_its_auth_string(tmp_path):
    port = free_port()
    auth = local_auth.prefect_env(tmp_path / "credentials")["PREFECT_API_AUTH_STRING"]
    with serve.local_server(tmp_path / "prefect-home", port, auth, ui=False) as api_url:  # as `make serve` starts it
        assert api_url == f"http://{LOOPBACK}:{port}/api"
        assert serve.healthy(api_url)
        assert listening_addresses(port) == {LOOPBACK}
        for endpoint, body in (("flows/filter", "{}"), ("deployments/filter", "{}"), ("work_pools/", '{"name": "evil"}'),
                               ("flow_runs/filter", "{}")):  # fmt: skip
            assert as_nobody(f"{api_url}/{endpoint}", "POST", body) == 401, endpoint
            assert as_nobody(f"{api_url}/{endpoint}", "POST", body, auth="vae:guess") == 401, endpoint
        assert serve.status_of(f"{api_url}/flows/count", auth) == 200
        # `make serve` again finds it answering, asking for the same string: it is reused
        with serve.local_server(tmp_path / "prefect-home", port, auth, ui=False) as again:
            assert again == api_url
        # a server that does not ask for our string (another account's) is refused, not used
        with pytest.raises(serve.ServerError, match="does not ask for this project's auth string"):
            with serve.local_server(tmp_path / "prefect-home", port, "vae:another", ui=False):
                pass
    assert not listening_addresses(port)  # stopped with its whole process group


EPHEMERAL_PROBE = """
import json, urllib.error, urllib.request
from prefect import flow, get_client

@flow
def probe() -> str:
    with get_client(sync_client=True) as client:  # the ephemeral server this flow run talks to
        return str(client.api_url).rstrip("/")

url = probe()
request = urllib.request.Request(url + "/flows/count", data=b"{}", method="POST",
                                 headers={"Content-Type": "application/json"})
try:
    status = urllib.request.urlopen(request, timeout=30).status
except urllib.error.HTTPError as exc:
    status = exc.code
print(json.dumps({"url": url, "without_auth": status}))
"""


def test_make_flow_s_ephemeral_prefect_server_asks_for_the_auth_string(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_") and k != "PREFECT_SERVER_API_AUTH_STRING"}
    env.update(VAE_CREDENTIALS_DIR=str(tmp_path / "credentials"), PREFECT_HOME=str(tmp_path / "prefect"),
               PREFECT_SERVER_ALLOW_EPHEMERAL_MODE="true",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")  # a busy CI machine starts it slowly  # fmt: skip
    # what `make flow` runs, with a probe for the flow
    proc = subprocess.run([sys.executable, "-m", "pipeline.local_auth", "exec", "--", sys.executable, "-c", EPHEMERAL_PROBE],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["url"].startswith(f"http://{LOOPBACK}:") and seen["without_auth"] == 401, seen
    auth = local_auth.read_env_file(tmp_path / "credentials" / "local.env")["VAE_LOCAL_PREFECT_AUTH_STRING"]
    assert auth not in proc.stdout + proc.stderr
