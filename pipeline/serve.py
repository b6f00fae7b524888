"""`make serve`: scheduled retraining on this machine.

Uses the Prefect server `PREFECT_API_URL` names (self-hosted or Prefect Cloud);
with none configured it starts one on 127.0.0.1 (`PREFECT_SERVER_API_PORT`,
default 4200; its database under `PREFECT_HOME`), or reuses one already
answering there. Then it creates the work pools and deployments
(`pipeline.deploy`) and runs a `process` worker on the cpu pool until Ctrl-C,
which stops the worker and any server it started.

A server it starts asks for an auth string (Prefect's `PREFECT_SERVER_API_AUTH_STRING`),
generated once into `.credentials/local.env`; the worker and this process send it
(`PREFECT_API_AUTH_STRING`). A server found already answering on the port is used
only if it refuses a request without that string and accepts one with it: any
local account can start a server on a free port, and the root worker would then
run whatever deployments it serves.
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator, Mapping

from prefect.settings import (
    PREFECT_API_AUTH_STRING,
    PREFECT_API_URL,
    PREFECT_HOME,
    PREFECT_SERVER_API_PORT,
    temporary_settings,
)

from pipeline import deploy, dvcrun, local_auth, procs
from pipeline.flows import resolve_root
from vae_mlops import cli_args
from vae_mlops.errors import VaeMlopsError
from vae_mlops.params import load_params

HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 180.0


class ServerError(VaeMlopsError):
    """The local Prefect server could not be started."""


def prefect_bin() -> str:
    return procs.venv_bin("prefect")


def healthy(api_url: str, timeout_s: float = 2.0) -> bool:
    return procs.http_ok(f"{api_url}/health", timeout_s)


def status_of(url: str, auth_string: str | None = None, timeout_s: float = 10.0) -> int | None:
    """The HTTP status of POST `url` (Prefect's basic `Authorization` when given); None when nothing answers."""
    return procs.http_status(url, auth_string, "POST", timeout_s)


def guarded_by(api_url: str, auth_string: str) -> bool:
    """The server refuses a request without `auth_string` (401) and answers one with it."""
    url = f"{api_url}/flows/count"
    return status_of(url) == 401 and status_of(url, auth_string) == 200


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex((HOST, port)) == 0


def process_env(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """What every Prefect process this project starts gets: its home, this venv first, no telemetry."""
    return dvcrun.tool_env({"PREFECT_HOME": str(home), **(extra or {})})


def stop(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left."""
    procs.stop_process_group(proc, grace_s)


@contextmanager
def local_server(
    home: Path, port: int, auth_string: str, ui: bool = True, extra_env: Mapping[str, str] | None = None
) -> Iterator[str]:
    """A Prefect server on 127.0.0.1:`port` asking for `auth_string`, its sqlite database under `home`.

    Yields its API URL. A Prefect server already answering on that port is reused
    (and left running) only if it asks for the same string.
    """
    api_url = f"http://{HOST}:{port}/api"
    if healthy(api_url):
        if not guarded_by(api_url, auth_string):
            raise ServerError(
                f"a Prefect server already answers on {HOST}:{port} but does not ask for this project's auth string "
                f"({local_auth.folder() / local_auth.FILE_NAME}); it may be another account's. Stop it, or set "
                "PREFECT_SERVER_API_PORT to a free port"
            )
        yield api_url
        return
    if port_in_use(port):
        raise ServerError(f"{HOST}:{port} is taken by something that is not a Prefect server; set PREFECT_SERVER_API_PORT")
    home.mkdir(parents=True, exist_ok=True)
    log_path = home / "server.log"
    cmd = [prefect_bin(), "server", "start", "--host", HOST, "--port", str(port), "--analytics-off"]
    cmd.append("--ui" if ui else "--no-ui")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd, env=process_env(home, {"PREFECT_API_URL": api_url, **(extra_env or {}),
                                        "PREFECT_SERVER_API_AUTH_STRING": auth_string}),
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not healthy(api_url):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise ServerError(f"the Prefect server on {HOST}:{port} did not start; {log_path} ends:\n{tail}")
            time.sleep(0.5)
        yield api_url
    finally:
        stop(proc)


def start_worker(pool: str, api_url: str, home: Path, run_once: bool = False, extra_env=None, **popen) -> subprocess.Popen:
    """`prefect worker start --pool <pool> --type process` as a child process."""
    cmd = [prefect_bin(), "worker", "start", "--pool", pool, "--type", "process"]
    if run_once:
        cmd.append("--run-once")
    env = process_env(home, {"PREFECT_API_URL": api_url, **(extra_env or {})})
    return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, start_new_session=True, **popen)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def stop_on_signals() -> None:
    """Ctrl-C and SIGTERM both stop the worker and the server cleanly.

    Set explicitly: a process started in the background by a non-interactive
    shell (CI, nohup) inherits SIGINT as ignored, and Python then never raises
    KeyboardInterrupt; SIGTERM (docker stop, systemd) would otherwise kill this
    process alone and orphan the server and worker it started.
    """
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.serve", description=__doc__.splitlines()[0])
    cli_args.add_root_arg(parser, default=None, help="the checkout (default: this one)")
    parser.add_argument("--port", type=int, default=None, help="local server port (default PREFECT_SERVER_API_PORT)")
    args = parser.parse_args(argv)
    stop_on_signals()
    root = resolve_root(args.root)
    params = load_params(root / "params.yaml")
    home = Path(PREFECT_HOME.value()).expanduser()
    with ExitStack() as stack:
        api_url = PREFECT_API_URL.value()
        auth_string = PREFECT_API_AUTH_STRING.value()
        if not api_url:
            port = args.port or int(PREFECT_SERVER_API_PORT.value())
            try:
                auth_string = local_auth.prefect_env()["PREFECT_API_AUTH_STRING"]
                api_url = stack.enter_context(local_server(home, port, auth_string))
            except (local_auth.CredentialsError, ServerError) as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            print(f"Prefect server on {api_url} (UI http://{HOST}:{port}; its auth string is "
                  f"VAE_LOCAL_PREFECT_AUTH_STRING in {local_auth.folder() / local_auth.FILE_NAME}); "
                  f"log {home / 'server.log'}", flush=True)  # fmt: skip
        updates = {PREFECT_API_URL: api_url, **({PREFECT_API_AUTH_STRING: auth_string} if auth_string else {})}
        stack.enter_context(temporary_settings(updates=updates))
        try:
            ids = deploy.deploy_all(root, params)
        except deploy.SourceError as exc:  # not a git checkout with a commit: nothing to pin
            print(f"error: {exc}", file=sys.stderr)
            return 2
        for name, dep_id in ids.items():
            print(f"deployment {name}: {dep_id}", flush=True)
        print(
            f"retraining on '{params.orchestrate.retrain_cron}' ({params.orchestrate.timezone}); "
            f"worker on pool '{params.orchestrate.cpu_pool}'. Ctrl-C stops it.",
            flush=True,
        )
        worker = start_worker(params.orchestrate.cpu_pool, api_url, home,
                              extra_env={"PREFECT_API_AUTH_STRING": auth_string} if auth_string else None)
        try:
            return worker.wait()
        except KeyboardInterrupt:
            return 0
        finally:
            stop(worker)


if __name__ == "__main__":
    sys.exit(main())
