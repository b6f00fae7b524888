"""`make services`: the team stack on this machine — PostgreSQL, MLflow (basic auth) and Prefect (auth string).

    python -m pipeline.services start    # start what is not running, wait for health, print `export` lines
    python -m pipeline.services stop     # stop all three cleanly; their data stays
    python -m pipeline.services status  # one line per service; exit 3 when one is down
    python -m pipeline.services env      # the `export` lines of a running stack

`eval "$(make -s services)"` points a shell at the stack. Everything lives in
one git-ignored folder (`VAE_SERVICES_DIR`, default `.services/`, 0700 and
checked to be this account's before it is trusted): MLflow's proxied artifacts,
logs, pid files and `credentials.env` (0600), where credentials not given in the
environment are generated once. Every server listens on 127.0.0.1 only;
docs/team.md shows how to serve a team, docs/security.md who may do what.

Least privilege: PostgreSQL starts with an environment of PATH and locale only
(no secret reaches the `postgres` account); MLflow and Prefect connect as
their own non-superuser roles, each owning only its databases; MLflow has one
account per purpose (`pipeline` writes, `reader` reads, the admin only manages
accounts) and only the admin and the writer may create names.

PostgreSQL refuses to run as root, so as root it runs as Debian's `postgres`
user (`runuser`), its cluster in a folder that account owns (under its home),
so a checkout under a 0700 folder works; any other user runs it directly, the
cluster under `.services/`. Passwords never appear on a command line or in a
URI: the servers get them through libpq's `PGPASSWORD`. Two `make services` at
once take turns on a lock.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import json
import os
import pwd
import secrets
import shlex
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping
from urllib.parse import quote

import psycopg
from psycopg import sql

from pipeline import console, procs
from pipeline.local_auth import CredentialsError, private_folder, read_env_file, write_env_file
from vae_mlops import atomic, inference_log
from vae_mlops.errors import VaeMlopsError
from vae_mlops.locks import wait_flock

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[1]
PG_OS_USER = "postgres"  # the unprivileged account PostgreSQL runs as when this runs as root
# PostgreSQL role -> (its password's credential, the databases it owns); neither is a superuser
PG_ROLES = {"mlflow": ("VAE_PG_MLFLOW_PASSWORD", ("mlflow", "mlflow_auth")), "prefect": ("VAE_PG_PREFECT_PASSWORD", ("prefect",))}
# MLflow accounts: the admin manages accounts only; the pipeline writes (and alone may create names); reader reads
MLFLOW_ADMIN, MLFLOW_WRITER, MLFLOW_READER = "admin", "pipeline", "reader"
# Credentials: taken from the environment when set there, else from credentials.env, else generated once.
CREDENTIALS = (
    "VAE_PG_PASSWORD",  # the cluster's superuser `vae`: only this module uses it, to make roles and databases
    "VAE_PG_MLFLOW_PASSWORD",
    "VAE_PG_PREFECT_PASSWORD",
    "VAE_MLFLOW_ADMIN_PASSWORD",
    "VAE_MLFLOW_WRITER_PASSWORD",
    "VAE_MLFLOW_READER_PASSWORD",
    "MLFLOW_FLASK_SERVER_SECRET_KEY",
    "PREFECT_API_AUTH_STRING",
    "VAE_PG_RECORDER_PASSWORD",  # the scoring server's role in `inference`: INSERT into the table, nothing else
    "VAE_PG_MONITOR_PASSWORD",  # the monitor's and the snapshot collector's role: SELECT only
)
# The inference table's database and its two roles (vae_mlops.inference_log)
INFERENCE_DB, PG_RECORDER, PG_MONITOR = "inference", "vae_recorder", "vae_monitor"
LEGACY_NAMES = {"VAE_MLFLOW_ADMIN_PASSWORD": "MLFLOW_TRACKING_PASSWORD"}  # credentials.env of older versions
# The only environment PostgreSQL's programs get: nothing of the caller's (its secrets) reaches the postmaster.
PG_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


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
    def pg_root(self) -> Path:
        """The cluster's folder: under `.services/` for a normal account; as root, one the `postgres` account owns.

        As root, `.services/` is 0700 and root's: the `postgres` account cannot enter it,
        nor any checkout under root's home. So the cluster lives under that account's
        home, one folder per services folder.
        """
        if not as_root():
            return self.data_dir
        key = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:16]
        return Path(pwd.getpwnam(PG_OS_USER).pw_dir) / "vae-mlops" / key

    @property
    def pgdata(self) -> Path:
        return self.pg_root / "postgres"

    @property
    def socket_dir(self) -> Path:
        return self.pg_root / "pgsocket"

    @property
    def lock_file(self) -> Path:
        return self.data_dir / "services.lock"

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

    def db_uri(self, driver: str, database: str, role: str) -> str:
        """A SQLAlchemy URI without the password (libpq and asyncpg read `PGPASSWORD`)."""
        return f"postgresql+{driver}://{role}@{HOST}:{self.pg_port}/{database}"

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def pid_file(self, name: str) -> Path:
        return self.data_dir / f"{name}.pid"


# ---------------------------------------------------------------- credentials


def credentials(settings: Settings, env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Each credential from the environment, else `credentials.env`, else generated and saved there (0600)."""
    saved = read_env_file(settings.credentials_file)
    for new, old in LEGACY_NAMES.items():
        if new not in saved and old in saved:
            saved[new] = saved[old]
    generated = {k: secrets.token_urlsafe(24) for k in CREDENTIALS}
    generated["MLFLOW_FLASK_SERVER_SECRET_KEY"] = secrets.token_urlsafe(32)
    generated["PREFECT_API_AUTH_STRING"] = f"admin:{secrets.token_urlsafe(24)}"
    creds = {k: env.get(k) or saved.get(k) or generated[k] for k in CREDENTIALS}
    if any(saved.get(k) != creds[k] for k in CREDENTIALS) or set(saved) - set(CREDENTIALS):
        write_env_file(settings.credentials_file, creds,
                       "Credentials of the services in this folder (pipeline/services.py). Keep private.")  # fmt: skip
    os.chmod(settings.credentials_file, 0o600)
    return creds


def exports(settings: Settings, creds: Mapping[str, str]) -> str:
    """The `export` lines a client shell needs (`eval` them): the pipeline's writer, the scoring server's reader."""
    values = {
        "MLFLOW_TRACKING_URI": settings.mlflow_url,
        "MLFLOW_TRACKING_USERNAME": MLFLOW_WRITER,
        "MLFLOW_TRACKING_PASSWORD": creds["VAE_MLFLOW_WRITER_PASSWORD"],
        "VAE_SERVE_MLFLOW_USERNAME": MLFLOW_READER,
        "VAE_SERVE_MLFLOW_PASSWORD": creds["VAE_MLFLOW_READER_PASSWORD"],
        "PREFECT_API_URL": settings.prefect_url,
        "PREFECT_API_AUTH_STRING": creds["PREFECT_API_AUTH_STRING"],
        inference_log.ENV_URL: settings.db_uri("psycopg", INFERENCE_DB, PG_RECORDER),
        inference_log.ENV_PASSWORD: creds["VAE_PG_RECORDER_PASSWORD"],
        inference_log.ENV_READER_URL: settings.db_uri("psycopg", INFERENCE_DB, PG_MONITOR),
        inference_log.ENV_READER_PASSWORD: creds["VAE_PG_MONITOR_PASSWORD"],
    }
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in values.items())


@contextlib.contextmanager
def exclusive(settings: Settings, what: str) -> Iterator[None]:
    """One `start` or `stop` at a time per services folder; a second one says so on stderr and waits its turn."""
    fd = os.open(settings.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"another `make services` is using {settings.data_dir}; waiting for it to finish before "
                  f"the {what}", file=sys.stderr, flush=True)  # fmt: skip
            if not wait_flock(fd, settings.timeout_s * 3, poll_s=0.5):
                raise ServicesError(f"another `make services` still holds {settings.lock_file}; wait for it, or stop it")
        yield
    finally:
        os.close(fd)  # releases the lock


def private_dirs(settings: Settings) -> None:
    """`.services/` and what the servers write in it: this account's alone (0700), checked before use."""
    try:
        for folder in (settings.data_dir, settings.logs, settings.data_dir / "mlartifacts", settings.data_dir / "prefect"):
            private_folder(folder)
    except CredentialsError as exc:
        raise ServicesError(str(exc)) from None
    for path in [*settings.logs.glob("*.log"), settings.credentials_file, *settings.data_dir.glob("*.ini")]:
        if path.is_file() and not path.is_symlink():
            os.chmod(path, 0o600)


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
    return [shutil.which("runuser") or "/usr/sbin/runuser", "-u", PG_OS_USER, "--", *args] if as_root() else args


def pg_run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """A PostgreSQL program with `PG_ENV` as its whole environment (nothing of ours reaches the server)."""
    return subprocess.run(pg_command(args), env=PG_ENV, **kwargs)


def _postgres_account() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(PG_OS_USER)
    except KeyError:
        raise ServicesError(f"running as root, PostgreSQL needs the `{PG_OS_USER}` account; run `make setup`") from None


def prepare_pg_root(settings: Settings) -> None:
    """The cluster's folder, private to the account PostgreSQL runs as; an older root stack's cluster moved there."""
    if not as_root():
        return
    account = _postgres_account()
    for folder in (settings.pg_root.parent, settings.pg_root):
        if pg_run(["mkdir", "-p", "-m", "0700", str(folder)], capture_output=True).returncode != 0:
            raise ServicesError(f"the `{PG_OS_USER}` account cannot make {folder}; check its home folder")
        info = os.lstat(folder)
        if info.st_uid != account.pw_uid or not os.path.isdir(folder) or os.path.islink(folder):
            raise ServicesError(f"{folder} is not a folder of the `{PG_OS_USER}` account; remove it and rerun")
        os.chmod(folder, 0o700)
    legacy = settings.data_dir / "postgres"
    if (legacy / "PG_VERSION").exists() and not settings.pgdata.exists():
        # a cluster an older version kept in `.services/` (which the `postgres` account can no longer enter)
        pg_run([pg_bin("pg_ctl"), "stop", "-D", str(legacy), "-m", "fast", "-w"], capture_output=True)
        shutil.move(str(legacy), str(settings.pgdata))
        print(f"moved the database cluster from {legacy} to {settings.pgdata}", file=sys.stderr)


def init_postgres(settings: Settings, password: str) -> None:
    """A new cluster in `pgdata`: password (scram) authentication for every connection."""
    pwfile = settings.pg_root / ".pwfile"  # where the `postgres` account, and only it, can read it
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
            done = pg_run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd="/")
    finally:
        pwfile.unlink(missing_ok=True)
    if done.returncode != 0:
        shutil.rmtree(settings.pgdata, ignore_errors=True)  # no half-made cluster left behind
        raise ServicesError(f"initdb failed; read {settings.log('initdb')}")


def _give_to_postgres(*paths: Path) -> None:
    if as_root():
        for path in paths:
            shutil.chown(path, PG_OS_USER, PG_OS_USER)


def pg_ready(settings: Settings, password: str) -> bool:

    try:
        with psycopg.connect(host=HOST, port=settings.pg_port, user=settings.pg_user, password=password,
                             dbname="postgres", connect_timeout=3):  # fmt: skip
            return True
    except psycopg.Error:
        return False


def pg_running(settings: Settings) -> bool:
    if not (settings.pgdata / "PG_VERSION").exists():
        return False
    return pg_run([pg_bin("pg_ctl"), "status", "-D", str(settings.pgdata)], capture_output=True, cwd="/").returncode == 0


def start_postgres(settings: Settings, creds: Mapping[str, str]) -> None:
    password = creds["VAE_PG_PASSWORD"]
    prepare_pg_root(settings)
    if not (settings.pgdata / "PG_VERSION").exists():
        init_postgres(settings, password)
    settings.socket_dir.mkdir(mode=0o700, exist_ok=True)
    _give_to_postgres(settings.socket_dir)
    log = settings.log("postgres")
    if not pg_running(settings):
        options = f"-c listen_addresses={HOST} -p {settings.pg_port} -c unix_socket_directories={settings.socket_dir}"
        # no `-l`: the server writes to the log this process opened, in `.services/logs` (0600, ours)
        cmd = [pg_bin("pg_ctl"), "start", "-D", str(settings.pgdata), "-o", options,
               "-w", "-t", str(int(settings.timeout_s))]  # fmt: skip
        # After a crash, the dead postmaster's backends may hold its shared memory for a moment: retry.
        for attempt in range(3):
            with open(log, "ab") as out:
                if pg_run(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd="/").returncode == 0:
                    break
            if attempt == 2:
                raise ServicesError(f"PostgreSQL did not start on {HOST}:{settings.pg_port}; read {log}")
            time.sleep(3)
    wait_until(lambda: pg_ready(settings, password), settings, "PostgreSQL", log)
    create_databases(settings, creds)


def create_databases(settings: Settings, creds: Mapping[str, str]) -> None:
    """Each service's role (login, no superuser, no CREATEDB/CREATEROLE) owning its databases, closed to others."""

    def connect(dbname: str):
        return psycopg.connect(host=HOST, port=settings.pg_port, user=settings.pg_user,
                               password=creds["VAE_PG_PASSWORD"], dbname=dbname, autocommit=True)  # fmt: skip

    with connect("postgres") as conn:
        roles = {row[0] for row in conn.execute("SELECT rolname FROM pg_roles")}
        owners = dict(conn.execute("SELECT datname, pg_get_userbyid(datdba) FROM pg_database").fetchall())
        for role, (secret, databases) in PG_ROLES.items():
            verb = "ALTER" if role in roles else "CREATE"
            conn.execute(sql.SQL(verb + " ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION PASSWORD {}")
                         .format(sql.Identifier(role), sql.Literal(creds[secret])))  # fmt: skip
            for name in databases:
                if name not in owners:
                    conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name), sql.Identifier(role)))
                elif owners[name] != role:
                    conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(sql.Identifier(name), sql.Identifier(role)))
                    _hand_over_tables(connect, name, settings.pg_user, role)
                conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(name)))
    with connect("prefect") as conn:  # Prefect's migrations want pg_trgm; make it here, where the superuser is
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    create_inference_db(settings, creds, connect)


def create_inference_db(settings: Settings, creds: Mapping[str, str], connect) -> None:
    """The inference table in its own database, owned by the superuser; the server may only insert, the monitor read."""
    with connect("postgres") as conn:
        roles = {row[0] for row in conn.execute("SELECT rolname FROM pg_roles")}
        for role, secret in ((PG_RECORDER, "VAE_PG_RECORDER_PASSWORD"), (PG_MONITOR, "VAE_PG_MONITOR_PASSWORD")):
            verb = "ALTER" if role in roles else "CREATE"
            conn.execute(sql.SQL(verb + " ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION PASSWORD {}")
                         .format(sql.Identifier(role), sql.Literal(creds[secret])))  # fmt: skip
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (INFERENCE_DB,)).fetchone() is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(INFERENCE_DB)))
        conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(INFERENCE_DB)))
        conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}, {}").format(
            sql.Identifier(INFERENCE_DB), sql.Identifier(PG_RECORDER), sql.Identifier(PG_MONITOR)))
    owner = f"postgresql+psycopg://{settings.pg_user}:{quote(creds['VAE_PG_PASSWORD'], safe='')}@{HOST}:{settings.pg_port}/{INFERENCE_DB}"
    inference_log.ensure_table(owner)  # one definition of the table: the recorder's
    with connect(INFERENCE_DB) as conn:
        table = sql.Identifier(inference_log.TABLE_NAME)
        conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {}, {}").format(sql.Identifier(PG_RECORDER),
                                                                               sql.Identifier(PG_MONITOR)))  # fmt: skip
        conn.execute(sql.SQL("REVOKE ALL ON {} FROM PUBLIC").format(table))
        conn.execute(sql.SQL("GRANT INSERT ON {} TO {}").format(table, sql.Identifier(PG_RECORDER)))
        conn.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(table, sql.Identifier(PG_MONITOR)))


def _hand_over_tables(connect, database: str, old: str, new: str) -> None:
    """Tables, views, sequences and types an older version made as the superuser, given to the service's role."""
    query = """
        SELECT 'TABLE', c.oid::regclass::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'm') AND pg_get_userbyid(c.relowner) = %(old)s
        UNION ALL
        SELECT 'SEQUENCE', c.oid::regclass::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'public' AND c.relkind = 'S' AND pg_get_userbyid(c.relowner) = %(old)s
           AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid AND d.deptype IN ('a', 'i'))
        UNION ALL
        SELECT 'TYPE', t.oid::regtype::text FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
         WHERE n.nspname = 'public' AND t.typtype IN ('e', 'd') AND pg_get_userbyid(t.typowner) = %(old)s"""
    with connect(database) as conn:
        for kind, name in conn.execute(query, {"old": old}).fetchall():
            conn.execute(f'ALTER {kind} {name} OWNER TO "{new}"')


def stop_postgres(settings: Settings) -> None:
    if pg_running(settings):
        cmd = [pg_bin("pg_ctl"), "stop", "-D", str(settings.pgdata), "-m", "fast", "-w", "-t", "60"]
        if pg_run(cmd, capture_output=True, cwd="/").returncode != 0:
            raise ServicesError(f"PostgreSQL did not stop; read {settings.log('postgres')}")


# ---------------------------------------------------------------- MLflow and Prefect


def http_status(
    url: str, auth: tuple[str, str] | None = None, method: str = "GET", timeout_s: float = 15.0
) -> int | None:
    """The HTTP status of GET `url` (basic auth if given); None when nothing answers."""
    return procs.http_status(url, f"{auth[0]}:{auth[1]}" if auth is not None else None, method, timeout_s)


def mlflow_healthy(settings: Settings, creds: Mapping[str, str]) -> bool:
    auth = (MLFLOW_ADMIN, creds["VAE_MLFLOW_ADMIN_PASSWORD"])
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
        f"database_uri = {settings.db_uri('psycopg', 'mlflow_auth', 'mlflow')}\n"
        f"admin_username = {MLFLOW_ADMIN}\n"
        # MLflow's basic auth, and only the admin and the pipeline's writer may create names
        "authorization_function = pipeline.mlflow_auth:authenticate\n"
        # each request's password check is a slow hash; cache a verified one (one worker: nothing goes stale)
        "auth_cache_ttl_seconds = 60\n"
    )
    cmd = [procs.venv_bin("mlflow"), "server", "--app-name", "basic-auth",
           "--backend-store-uri", settings.db_uri("psycopg", "mlflow", "mlflow"),
           "--artifacts-destination", str(settings.data_dir / "mlartifacts"), "--serve-artifacts",
           "--host", HOST, "--port", str(settings.mlflow_port), "--workers", str(settings.mlflow_workers)]  # fmt: skip
    return cmd, {"MLFLOW_AUTH_CONFIG_PATH": str(auth_ini)}


def mlflow_env(creds: Mapping[str, str]) -> dict[str, str]:
    return {
        "MLFLOW_FLASK_SERVER_SECRET_KEY": creds["MLFLOW_FLASK_SERVER_SECRET_KEY"],
        "MLFLOW_AUTH_ADMIN_USERNAME": MLFLOW_ADMIN,
        "MLFLOW_AUTH_ADMIN_PASSWORD": creds["VAE_MLFLOW_ADMIN_PASSWORD"],
        "VAE_MLFLOW_CREATORS": f"{MLFLOW_ADMIN},{MLFLOW_WRITER}",
        "PGPASSWORD": creds["VAE_PG_MLFLOW_PASSWORD"],
    }


def mlflow_api(settings: Settings, creds: Mapping[str, str], method: str, endpoint: str, body: dict) -> tuple[int, str]:
    """One call to MLflow's REST API as the admin: (status, body text)."""
    request = urllib.request.Request(f"{settings.mlflow_url}/api/{endpoint}", method=method,
                                     data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})  # fmt: skip
    token = base64.b64encode(f"{MLFLOW_ADMIN}:{creds['VAE_MLFLOW_ADMIN_PASSWORD']}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def ensure_mlflow_accounts(settings: Settings, creds: Mapping[str, str]) -> None:
    """The writer and the reader exist with the passwords of `credentials.env`; the writer manages every
    experiment and registered model (those an older version made as the admin too), the reader only reads."""
    for user, secret in ((MLFLOW_WRITER, "VAE_MLFLOW_WRITER_PASSWORD"), (MLFLOW_READER, "VAE_MLFLOW_READER_PASSWORD")):
        body = {"username": user, "password": creds[secret]}
        status, text = mlflow_api(settings, creds, "POST", "2.0/mlflow/users/create", body)
        if status != 200 and "RESOURCE_ALREADY_EXISTS" in text:
            status, text = mlflow_api(settings, creds, "PATCH", "2.0/mlflow/users/update-password", body)
        if status != 200:
            raise ServicesError(f"could not set up MLflow's `{user}` account ({status}: {text[:200]}); "
                                f"read {settings.log('mlflow')}")  # fmt: skip
    for kind in ("experiment", "registered_model"):
        grant = {"username": MLFLOW_WRITER, "resource_type": kind, "resource_id": "*", "permission": "MANAGE"}
        status, text = mlflow_api(settings, creds, "POST", "3.0/mlflow/users/permissions/grant", grant)
        if status != 200 and "RESOURCE_ALREADY_EXISTS" not in text:
            raise ServicesError(f"could not grant `{MLFLOW_WRITER}` MANAGE on every {kind} ({status}: {text[:200]})")


def prefect_command(settings: Settings, creds: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    cmd = [procs.venv_bin("prefect"), "server", "start", "--host", HOST, "--port", str(settings.prefect_port),
           "--analytics-off"]  # fmt: skip
    env = {
        "PREFECT_HOME": str(settings.data_dir / "prefect"),
        "PREFECT_API_DATABASE_CONNECTION_URL": settings.db_uri("asyncpg", "prefect", "prefect"),
        "PGPASSWORD": creds["VAE_PG_PREFECT_PASSWORD"],
        "PREFECT_SERVER_API_AUTH_STRING": creds["PREFECT_API_AUTH_STRING"],
        "PREFECT_API_AUTH_STRING": creds["PREFECT_API_AUTH_STRING"],
        "PREFECT_API_URL": settings.prefect_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    return cmd, env


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
    env = {k: v for k, v in os.environ.items() if not _secret_or_client_setting(k)}
    env.update(extra_env)
    with open(settings.log(name), "ab") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=settings.data_dir)  # fmt: skip
    atomic.write_text(settings.pid_file(name), f"{proc.pid}\n")


def _secret_or_client_setting(name: str) -> bool:
    """A variable a server must not inherit: a client's MLflow/Prefect settings, anything that looks secret."""
    upper = name.upper()
    return upper.startswith(("MLFLOW_", "PREFECT_", "PG")) or any(
        word in upper for word in ("PASSWORD", "SECRET", "TOKEN", "AUTH", "CREDENTIAL", "KEY")
    )


def stop_server(settings: Settings, name: str, grace_s: float = 20.0) -> None:
    """SIGTERM the server's process group (it and its workers), SIGKILL what is left after `grace_s`."""
    pid = read_pid(settings, name)
    if pid is not None:
        procs.stop_process_group(pid, grace_s)
    settings.pid_file(name).unlink(missing_ok=True)


def wait_until(ready, settings: Settings, what: str, log: Path, name: str | None = None) -> None:
    alive = (lambda: read_pid(settings, name) is not None) if name is not None else None
    if not ready():  # a first start (a new cluster, migrations) takes minutes: say what it waits for
        print(f"waiting for {what} (up to {settings.timeout_s:.0f} s; its log: {log})", file=sys.stderr, flush=True)
    try:
        procs.wait_until(ready, settings.timeout_s, what, alive, poll_s=0.5)
    except procs.NotReady as exc:
        raise ServicesError(f"{exc}; read {log}") from None


# ---------------------------------------------------------------- the stack


def start(settings: Settings) -> dict[str, str]:
    """Start whatever is not running yet and wait until all three answer with credentials; returns them."""
    os.umask(0o077)  # artifacts, logs and everything the servers write: this account's alone
    private_dirs(settings)
    with exclusive(settings, "start"):
        creds = credentials(settings)
        start_postgres(settings, creds)
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
            spawn(settings, name, cmd, env)
        for name, (healthy, what, _) in servers.items():
            wait_until(healthy, settings, what, settings.log(name), name)
        ensure_mlflow_accounts(settings, creds)
    return creds


def stop(settings: Settings) -> None:
    private_dirs(settings)
    with exclusive(settings, "stop"):
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
            prefect_ui = settings.prefect_url.removesuffix("/api")
            print(f"UIs: MLflow {settings.mlflow_url} and Prefect {prefect_ui}; their logins are in "
                  f"{settings.credentials_file} (0600), and the exports below set them for this shell",
                  file=sys.stderr)  # fmt: skip
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
        return console.fail(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
