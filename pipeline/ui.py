"""`make ui`: the MLflow UI over this checkout's store, on 127.0.0.1, behind MLflow's basic auth.

The embedded store (`mlflow.db`, `mlartifacts/`) is what `make serve-model`
reads by default, so a UI that any local account could write to would let it
choose what gets served. The server runs MLflow's `basic-auth` app: one
account, `admin`, whose password is generated once into `.credentials/local.env`
(0600; the messages name the file, never the password). The user database sits
beside it (`.credentials/mlflow_auth.db`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipeline import local_auth, procs

HOST = "127.0.0.1"


def auth_config(where: Path) -> Path:
    """The auth app's ini: READ for every account by default, users kept in `where`."""
    ini = where / "mlflow_auth.ini"
    text = (
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{where / 'mlflow_auth.db'}\n"
        f"admin_username = {local_auth.UI_ADMIN}\n"
        "authorization_function = pipeline.mlflow_auth:authenticate\n"
        "auth_cache_ttl_seconds = 60\n"
    )
    if not ini.exists() or ini.read_text() != text:
        old = os.umask(0o077)
        try:
            ini.write_text(text)
        finally:
            os.umask(old)
    return ini


def command(port: int, store: Path, artifacts: Path) -> list[str]:
    return [procs.venv_bin("mlflow"), "ui", "--app-name", "basic-auth",
            "--backend-store-uri", f"sqlite:///{store}", "--default-artifact-root", str(artifacts),
            "--host", HOST, "--port", str(port)]  # fmt: skip


def server_env(where: Path) -> dict[str, str]:
    """What the auth app reads: its ini, the admin's first password, the session key, who may create."""
    creds = local_auth.load(where)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_AUTH_")}
    env.update(
        MLFLOW_AUTH_CONFIG_PATH=str(auth_config(where)),
        MLFLOW_AUTH_ADMIN_USERNAME=local_auth.UI_ADMIN,
        MLFLOW_AUTH_ADMIN_PASSWORD=creds["VAE_UI_ADMIN_PASSWORD"],
        MLFLOW_FLASK_SERVER_SECRET_KEY=creds["VAE_UI_FLASK_SECRET_KEY"],
        VAE_MLFLOW_CREATORS=local_auth.UI_ADMIN,
    )
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.ui", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--store", type=Path, default=Path("mlflow.db"), help="the sqlite tracking store")
    parser.add_argument("--artifacts", type=Path, default=Path("mlartifacts"))
    args = parser.parse_args(argv)
    where = local_auth.folder()
    try:
        env = server_env(local_auth.private_folder(where))
    except local_auth.CredentialsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cmd = command(args.port, args.store.absolute(), args.artifacts.absolute())
    print(f"MLflow UI on http://{HOST}:{args.port}: log in as `{local_auth.UI_ADMIN}`, the password is "
          f"VAE_UI_ADMIN_PASSWORD in {where / local_auth.FILE_NAME}", file=sys.stderr, flush=True)  # fmt: skip
    os.umask(0o077)  # what the server writes (its user database, a new store) is this account's alone
    os.execve(cmd[0], cmd, env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
