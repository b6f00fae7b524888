"""`make services`: the team stack on this machine — PostgreSQL, MLflow (basic auth) and Prefect (auth string).

    python -m pipeline.services start    # start what is not running, wait for health, print `export` lines
    python -m pipeline.services stop     # stop all three cleanly; their data stays
    python -m pipeline.services status  # one line per service; exit 3 when one is down
    python -m pipeline.services env      # the `export` lines of a running stack

`eval "$(make -s services)"` points a shell at the stack. Everything lives in
one git-ignored folder (`VAE_SERVICES_DIR`, default `.services/`): the database
cluster, MLflow's proxied artifacts, logs, pid files and `credentials.env`
(mode 0600), where credentials not given in the environment are generated once.
Every server listens on 127.0.0.1 only; docs/team.md shows how to serve a team.

PostgreSQL refuses to run as root, so as root it runs as Debian's `postgres`
user (`runuser`); any other user runs it directly. Passwords never appear on a
command line or in a URI: the servers get them through libpq's `PGPASSWORD`.
"""

from __future__ import annotations

import argparse
import base64
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from vae_mlops import atomic
from vae_mlops.errors import VaeMlopsError

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[1]
DATABASES = ("mlflow", "mlflow_auth", "prefect")
PG_OS_USER = "postgres"  # the unprivileged account PostgreSQL runs as when this runs as root
# Credentials: taken from the environment when set there, else from credentials.env, else generated once.
CREDENTIALS = (
    "VAE_PG_PASSWORD",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_FLASK_SERVER_SECRET_KEY",
    "PREFECT_API_AUTH_STRING",
)


class ServicesError(VaeMlopsError):
    """A service could not be started, stopped or reached; names the log to read."""


@dataclass(frozen=True)
class Settings:
    """Where the stack lives and which ports it takes; every field has an environment variable."""

    data_dir: Path
    pg_port: int
    mlflow_port: int
    prefect_port: int
    pg_user: str = "vae"
    mlflow_workers: int = 1  # one uvicorn process: no supervisor to kill a worker that starts slowly on a busy CPU
    timeout_s: float = 300.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "Settings":
        def port(name: str, default: int) -> int:
            raw = env.get(name, str(default))
            if not raw.isdigit() or not 0 < int(raw) < 65536:
                raise ServicesError(f"{name}={raw!r} is not a port number (1-65535); fix or unset it")
            return int(raw)

        return cls(
            data_dir=Path(env.get("VAE_SERVICES_DIR") or ROOT / ".services").resolve(),
            pg_port=port("VAE_PG_PORT", 5433),
            mlflow_port=port("VAE_MLFLOW_PORT", 5001),
            prefect_port=port("VAE_PREFECT_PORT", 4200),
            mlflow_workers=port("VAE_MLFLOW_WORKERS", 1),
            timeout_s=float(env.get("VAE_SERVICES_TIMEOUT_S", "300")),
        )

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "postgres"

    @property
    def socket_dir(self) -> Path:
        return self.data_dir / "pgsocket"

    @property
    def logs(self) -> Path:
        return self.data_dir / "logs"

    @property
    def credentials_file(self) -> Path:
        return self.data_dir / "credentials.env"

    @property
    def mlflow_url(self) -> str:
        return f"http://{HOST}:{self.mlflow_port}"

    @property
    def prefect_url(self) -> str:
        return f"http://{HOST}:{self.prefect_port}/api"

    def db_uri(self, driver: str, database: str) -> str:
        """A SQLAlchemy URI without the password (libpq and asyncpg read `PGPASSWORD`)."""
        return f"postgresql+{driver}://{self.pg_user}@{HOST}:{self.pg_port}/{database}"

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def pid_file(self, name: str) -> Path:
        return self.data_dir / f"{name}.pid"


# ---------------------------------------------------------------- credentials


def read_env_file(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line and not line.startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def credentials(settings: Settings, env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Each credential from the environment, else `credentials.env`, else generated and saved there (0600)."""
    saved = read_env_file(settings.credentials_file)
    generated = {
        "VAE_PG_PASSWORD": secrets.token_urlsafe(24),
        "MLFLOW_TRACKING_USERNAME": "admin",
        "MLFLOW_TRACKING_PASSWORD": secrets.token_urlsafe(24),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_urlsafe(32),
        "PREFECT_API_AUTH_STRING": f"admin:{secrets.token_urlsafe(24)}",
    }
    creds = {k: env.get(k) or saved.get(k) or generated[k] for k in CREDENTIALS}
    if any(k not in saved for k in CREDENTIALS):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        text = "# Credentials of the services in this folder (pipeline/services.py). Keep private.\n"
        text += "".join(f"{k}={creds[k]}\n" for k in CREDENTIALS)
        old = os.umask(0o077)
        try:
            atomic.write_text(settings.credentials_file, text)
        finally:
            os.umask(old)
    os.chmod(settings.credentials_file, 0o600)
    return creds


def exports(settings: Settings, creds: Mapping[str, str]) -> str:
    """The `export` lines a client shell needs (`eval` them)."""
    values = {
        "MLFLOW_TRACKING_URI": settings.mlflow_url,
        "MLFLOW_TRACKING_USERNAME": creds["MLFLOW_TRACKING_USERNAME"],
        "MLFLOW_TRACKING_PASSWORD": creds["MLFLOW_TRACKING_PASSWORD"],
        "PREFECT_API_URL": settings.prefect_url,
        "PREFECT_API_AUTH_STRING": creds["PREFECT_API_AUTH_STRING"],
    }
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in values.items())


# ---------------------------------------------------------------- PostgreSQL


def pg_bin(name: str) -> str:
    """A PostgreSQL program: `VAE_PG_BIN`, Debian's newest /usr/lib/postgresql/*/bin, or PATH."""
    folders = [os.environ["VAE_PG_BIN"]] if os.environ.get("VAE_PG_BIN") else []
    folders += sorted((str(p) for p in Path("/usr/lib/postgresql").glob("*/bin")), key=_version_key, reverse=True)
    for folder in folders:
        if (Path(folder) / name).exists():
            return str(Path(folder) / name)
    found = shutil.which(name)
    if found is None:
        raise ServicesError(f"PostgreSQL's `{name}` is not installed; run `make setup` (apt-get install postgresql)")
    return found


def _version_key(folder: str) -> int:
    version = Path(folder).parent.name
    return int(version) if version.isdigit() else 0


def as_root() -> bool:
    return os.geteuid() == 0


def pg_command(args: list[str]) -> list[str]:
    """`args` run as the `postgres` account when we are root (PostgreSQL refuses root), else as ourselves."""
    return ["runuser", "-u", PG_OS_USER, "--", *args] if as_root() else args


def _give_to_postgres(*paths: Path) -> None:
    if as_root():
        for path in paths:
            shutil.chown(path, PG_OS_USER, PG_OS_USER)


def _check_postgres_can_reach(settings: Settings) -> None:
    if not as_root():
        return
    try:
        subprocess.run(["id", PG_OS_USER], check=True, capture_output=True)
    except subprocess.CalledProcessError:
        raise ServicesError(f"running as root, PostgreSQL needs the `{PG_OS_USER}` account; run `make setup`") from None
    if subprocess.run(pg_command(["test", "-x", str(settings.data_dir)])).returncode != 0:
        raise ServicesError(
            f"the `{PG_OS_USER}` account cannot enter {settings.data_dir}: make it and its parent folders "
            "traversable (chmod o+x) or set VAE_SERVICES_DIR to a folder that is"
        )


def init_postgres(settings: Settings, password: str) -> None:
    """A new cluster in `pgdata`: password (scram) authentication for every connection."""
    pwfile = settings.data_dir / ".pwfile"
    settings.pgdata.mkdir(mode=0o700)
    old = os.umask(0o077)
    try:
        pwfile.write_text(password + "\n")
    finally:
        os.umask(old)
    _give_to_postgres(settings.pgdata, pwfile)
    cmd = [pg_bin("initdb"), "-D", str(settings.pgdata), "-U", settings.pg_user, f"--pwfile={pwfile}",
           "--auth-local=scram-sha-256", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C"]  # fmt: skip
    try:
        with open(settings.log("initdb"), "ab") as log:
            done = subprocess.run(pg_command(cmd), stdout=log, stderr=subprocess.STDOUT)
    finally:
        pwfile.unlink(missing_ok=True)
    if done.returncode != 0:
        shutil.rmtree(settings.pgdata, ignore_errors=True)  # no half-made cluster left behind
        raise ServicesError(f"initdb failed; read {settings.log('initdb')}")


def pg_ready(settings: Settings, password: str) -> bool:
    import psycopg

    try:
        with psycopg.connect(host=HOST, port=settings.pg_port, user=settings.pg_user, password=password,
                             dbname="postgres", connect_timeout=3):  # fmt: skip
            return True
    except psycopg.Error:
        return False


def pg_running(settings: Settings) -> bool:
    if not (settings.pgdata / "PG_VERSION").exists():
        return False
    return subprocess.run(pg_command([pg_bin("pg_ctl"), "status", "-D", str(settings.pgdata)]),
                          capture_output=True).returncode == 0  # fmt: skip


def start_postgres(settings: Settings, password: str) -> None:
    settings.logs.mkdir(parents=True, exist_ok=True)
    _check_postgres_can_reach(settings)
    if not (settings.pgdata / "PG_VERSION").exists():
        init_postgres(settings, password)
    log = settings.log("postgres")
    log.touch()
    settings.socket_dir.mkdir(mode=0o700, exist_ok=True)
    _give_to_postgres(log, settings.socket_dir)
    if not pg_running(settings):
        options = f"-c listen_addresses={HOST} -p {settings.pg_port} -c unix_socket_directories={settings.socket_dir}"
        cmd = [pg_bin("pg_ctl"), "start", "-D", str(settings.pgdata), "-l", str(log), "-o", options,
               "-w", "-t", str(int(settings.timeout_s))]  # fmt: skip
        # After a crash, the dead postmaster's backends may hold its shared memory for a moment: retry.
        for attempt in range(3):
            if subprocess.run(pg_command(cmd), capture_output=True).returncode == 0:
                break
            if attempt == 2:
                raise ServicesError(f"PostgreSQL did not start on {HOST}:{settings.pg_port}; read {log}")
            time.sleep(3)
    wait_until(lambda: pg_ready(settings, password), settings, "PostgreSQL", log)
    create_databases(settings, password)


def create_databases(settings: Settings, password: str) -> None:
    import psycopg

    with psycopg.connect(host=HOST, port=settings.pg_port, user=settings.pg_user, password=password,
                         dbname="postgres", autocommit=True) as conn:  # fmt: skip
        have = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
        for name in DATABASES:
            if name not in have:
                conn.execute(f'CREATE DATABASE "{name}"')


def stop_postgres(settings: Settings) -> None:
    if pg_running(settings):
        cmd = [pg_bin("pg_ctl"), "stop", "-D", str(settings.pgdata), "-m", "fast", "-w", "-t", "60"]
        if subprocess.run(pg_command(cmd), capture_output=True).returncode != 0:
            raise ServicesError(f"PostgreSQL did not stop; read {settings.log('postgres')}")


# ---------------------------------------------------------------- MLflow and Prefect


def http_status(
    url: str, auth: tuple[str, str] | None = None, method: str = "GET", timeout_s: float = 15.0
) -> int | None:
    """The HTTP status of GET `url` (basic auth if given); None when nothing answers."""
    request = urllib.request.Request(url, method=method, data=b"{}" if method == "POST" else None,
                                     headers={"Content-Type": "application/json"})
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def mlflow_healthy(settings: Settings, creds: Mapping[str, str]) -> bool:
    auth = (creds["MLFLOW_TRACKING_USERNAME"], creds["MLFLOW_TRACKING_PASSWORD"])
    url = f"{settings.mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1"
    return http_status(f"{settings.mlflow_url}/health") == 200 and http_status(url, auth) == 200


def prefect_healthy(settings: Settings, creds: Mapping[str, str]) -> bool:
    """/health answers, and an authenticated call reaches the database (the auth string is `user:password`)."""
    if http_status(f"{settings.prefect_url}/health") != 200:
        return False
    user, _, password = creds["PREFECT_API_AUTH_STRING"].partition(":")
    return http_status(f"{settings.prefect_url}/flows/count", (user, password), method="POST") == 200


def mlflow_command(settings: Settings) -> tuple[list[str], dict[str, str]]:
    auth_ini = settings.data_dir / "mlflow_auth.ini"
    auth_ini.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = {settings.db_uri('psycopg', 'mlflow_auth')}\n"
        "admin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # each request's password check is a slow hash; cache a verified one (one worker: nothing goes stale)
        "auth_cache_ttl_seconds = 60\n"
    )
    cmd = [_venv_bin("mlflow"), "server", "--app-name", "basic-auth",
           "--backend-store-uri", settings.db_uri("psycopg", "mlflow"),
           "--artifacts-destination", str(settings.data_dir / "mlartifacts"), "--serve-artifacts",
           "--host", HOST, "--port", str(settings.mlflow_port), "--workers", str(settings.mlflow_workers)]  # fmt: skip
    return cmd, {"MLFLOW_AUTH_CONFIG_PATH": str(auth_ini)}


def mlflow_env(creds: Mapping[str, str]) -> dict[str, str]:
    return {
        "MLFLOW_FLASK_SERVER_SECRET_KEY": creds["MLFLOW_FLASK_SERVER_SECRET_KEY"],
        "MLFLOW_AUTH_ADMIN_USERNAME": creds["MLFLOW_TRACKING_USERNAME"],
        "MLFLOW_AUTH_ADMIN_PASSWORD": creds["MLFLOW_TRACKING_PASSWORD"],
    }


def prefect_command(settings: Settings, creds: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    cmd = [_venv_bin("prefect"), "server", "start", "--host", HOST, "--port", str(settings.prefect_port),
           "--analytics-off"]  # fmt: skip
    env = {
        "PREFECT_HOME": str(settings.data_dir / "prefect"),
        "PREFECT_API_DATABASE_CONNECTION_URL": settings.db_uri("asyncpg", "prefect"),
        "PREFECT_SERVER_API_AUTH_STRING": creds["PREFECT_API_AUTH_STRING"],
        "PREFECT_API_AUTH_STRING": creds["PREFECT_API_AUTH_STRING"],
        "PREFECT_API_URL": settings.prefect_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    return cmd, env


def _venv_bin(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def read_pid(settings: Settings, name: str) -> int | None:
    """The pid of our `name` server if it is alive (a recycled pid running something else does not count)."""
    try:
        pid = int(settings.pid_file(name).read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if name.encode() in cmdline else None


def spawn(settings: Settings, name: str, cmd: list[str], extra_env: Mapping[str, str]) -> None:
    """Start `cmd` detached in its own session, output to logs/<name>.log, pid in <name>.pid."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env.update(extra_env)
    with open(settings.log(name), "ab") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=settings.data_dir)  # fmt: skip
    atomic.write_text(settings.pid_file(name), f"{proc.pid}\n")


def stop_server(settings: Settings, name: str, grace_s: float = 20.0) -> None:
    """SIGTERM the server's process group (it and its workers), SIGKILL what is left after `grace_s`."""
    pid = read_pid(settings, name)
    if pid is not None:
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and _group_alive(pid):
                time.sleep(0.2)
            if not _group_alive(pid):
                break
    settings.pid_file(name).unlink(missing_ok=True)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # zombies of a group whose leader we are not the parent of are reaped by init; treat them as gone
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def wait_until(ready, settings: Settings, what: str, log: Path, name: str | None = None) -> None:
    deadline = time.monotonic() + settings.timeout_s
    while not ready():
        if name is not None and read_pid(settings, name) is None:
            raise ServicesError(f"{what} exited while starting; read {log}")
        if time.monotonic() > deadline:
            raise ServicesError(f"{what} did not answer within {settings.timeout_s:.0f}s; read {log}")
        time.sleep(0.5)


# ---------------------------------------------------------------- the stack


def start(settings: Settings) -> dict[str, str]:
    """Start whatever is not running yet and wait until all three answer with credentials; returns them."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    settings.logs.mkdir(exist_ok=True)
    creds = credentials(settings)
    pg_env = {"PGPASSWORD": creds["VAE_PG_PASSWORD"]}
    start_postgres(settings, creds["VAE_PG_PASSWORD"])
    servers = {
        "mlflow": (lambda: mlflow_healthy(settings, creds), "the MLflow server", settings.mlflow_port),
        "prefect": (lambda: prefect_healthy(settings, creds), "the Prefect server", settings.prefect_port),
    }
    for name, (healthy, what, port) in servers.items():
        if read_pid(settings, name) is not None or healthy():
            continue
        if http_status(f"http://{HOST}:{port}/") is not None:
            raise ServicesError(f"{HOST}:{port}, wanted by {what}, is taken by another program; choose another "
                                f"port ({'VAE_MLFLOW_PORT' if name == 'mlflow' else 'VAE_PREFECT_PORT'})")
        if name == "mlflow":
            cmd, env = mlflow_command(settings)
            env.update(mlflow_env(creds))
        else:
            cmd, env = prefect_command(settings, creds)
        spawn(settings, name, cmd, {**env, **pg_env})
    for name, (healthy, what, _) in servers.items():
        wait_until(healthy, settings, what, settings.log(name), name)
    return creds


def stop(settings: Settings) -> None:
    for name in ("prefect", "mlflow"):
        stop_server(settings, name)
    stop_postgres(settings)


def status(settings: Settings) -> dict[str, bool]:
    creds = read_env_file(settings.credentials_file)
    if set(CREDENTIALS) - set(creds):
        return {"postgres": False, "mlflow": False, "prefect": False}
    creds.update({k: os.environ[k] for k in CREDENTIALS if os.environ.get(k)})
    return {
        "postgres": pg_ready(settings, creds["VAE_PG_PASSWORD"]),
        "mlflow": mlflow_healthy(settings, creds),
        "prefect": prefect_healthy(settings, creds),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.services", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["start", "stop", "status", "env"])
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        if args.command == "start":
            creds = start(settings)
            print(f"services up in {settings.data_dir}: MLflow {settings.mlflow_url}, Prefect {settings.prefect_url}, "
                  f"PostgreSQL {HOST}:{settings.pg_port}; logs in {settings.logs}", file=sys.stderr)  # fmt: skip
            sys.stdout.write(exports(settings, creds))
        elif args.command == "stop":
            stop(settings)
            print(f"services in {settings.data_dir} stopped", file=sys.stderr)
        elif args.command == "status":
            states = status(settings)
            for name, up in states.items():
                print(f"{name}: {'up' if up else 'down'}")
            return 0 if all(states.values()) else 3
        else:
            if not all(status(settings).values()):
                raise ServicesError(f"the services in {settings.data_dir} are not all running; run `make services`")
            sys.stdout.write(exports(settings, credentials(settings)))
    except ServicesError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
