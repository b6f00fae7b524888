"""Credentials of the servers the single-user default starts: `make ui`, `make serve` and `make flow`.

    python -m pipeline.local_auth exec -- CMD...   # CMD with the Prefect auth string set (what `make flow` runs)
    python -m pipeline.local_auth where            # the file that holds them

Every server this project starts asks for credentials, the embedded default
included, because any local account can reach a port on 127.0.0.1. They are
generated once into `.credentials/local.env` (the folder 0700, the file 0600,
both git-ignored; `VAE_CREDENTIALS_DIR` moves them), and nothing prints them:
messages name the file instead.
"""

from __future__ import annotations

import argparse
import os
import secrets
import stat
import sys
from pathlib import Path
from typing import Callable, Mapping

from prefect.settings import PREFECT_API_URL

from pipeline import console
from vae_mlops import atomic
from vae_mlops.errors import VaeMlopsError

ROOT = Path(__file__).resolve().parents[1]
FILE_NAME = "local.env"
# name -> how to make it; generated the first time it is missing
GENERATED: dict[str, Callable[[], str]] = {
    "VAE_UI_ADMIN_PASSWORD": lambda: secrets.token_urlsafe(24),
    "VAE_UI_FLASK_SECRET_KEY": lambda: secrets.token_urlsafe(32),
    "VAE_LOCAL_PREFECT_AUTH_STRING": lambda: f"vae:{secrets.token_urlsafe(24)}",
}
UI_ADMIN = "admin"


class CredentialsError(VaeMlopsError):
    """A credentials folder is not private to this account; names it and what to do."""


def private_folder(path: Path) -> Path:
    """`path` as a folder only this account can enter: made 0700, or checked before it is trusted.

    An existing folder must be a real folder (not a symlink) owned by this account;
    then its mode is set to 0700 (a folder an older version made 0755 is tightened).
    Anything else is refused: another account could read or swap what we put there.
    """
    path = Path(path)
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise CredentialsError(f"{path} is not a folder (a symlink or a file); remove it or choose another folder")
    if info.st_uid != os.geteuid():
        raise CredentialsError(
            f"{path} belongs to uid {info.st_uid}, not to this account (uid {os.geteuid()}); another account could "
            "read or replace what is kept there. Remove it, or choose another folder"
        )
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def read_env_file(path: Path) -> dict[str, str]:
    """`NAME=value` lines (no quoting, `#` comments)."""
    if not path.exists():
        return {}
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line and not line.startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def write_env_file(path: Path, values: Mapping[str, str], header: str) -> None:
    """The file replaced whole (temp + rename), mode 0600 from its first byte."""
    old = os.umask(0o077)
    try:
        atomic.write_text(path, f"# {header}\n" + "".join(f"{k}={v}\n" for k, v in values.items()))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)


def folder(env: Mapping[str, str] = os.environ) -> Path:
    return Path(env.get("VAE_CREDENTIALS_DIR") or ROOT / ".credentials").absolute()


def load(where: Path | None = None) -> dict[str, str]:
    """The local credentials, generating (once) those missing; the folder is checked first."""
    where = private_folder(where or folder())
    path = where / FILE_NAME
    saved = read_env_file(path)
    values = {k: saved.get(k) or make() for k, make in GENERATED.items()}
    if values != {k: saved.get(k) for k in GENERATED}:
        write_env_file(path, {**saved, **values}, "Credentials of `make ui`, `make serve` and `make flow`. Keep private.")
    elif stat.S_IMODE(path.stat().st_mode) != 0o600:
        os.chmod(path, 0o600)
    return values


def prefect_env(where: Path | None = None) -> dict[str, str]:
    """The auth string for a Prefect server this project starts and for its clients (Prefect 3 settings)."""
    auth = load(where)["VAE_LOCAL_PREFECT_AUTH_STRING"]
    return {"PREFECT_SERVER_API_AUTH_STRING": auth, "PREFECT_API_AUTH_STRING": auth}


def _configured_api_url() -> str | None:

    return PREFECT_API_URL.value()


def exec_with_prefect_auth(cmd: list[str]) -> None:
    """Replace this process by `cmd`; with no Prefect API configured, its ephemeral server asks for our string.

    Prefect's ephemeral mode starts a real server on a free 127.0.0.1 port in a
    subprocess that inherits this environment, so the server and the client both
    read the string from it. A configured API (`make services`, a team server)
    keeps the user's own `PREFECT_API_AUTH_STRING`.
    """
    env = dict(os.environ)
    if not _configured_api_url():
        env.update(prefect_env())
    os.execvpe(cmd[0], cmd, env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.local_auth", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("exec", help="run a command with the Prefect auth string set")
    run.add_argument("cmd", nargs=argparse.REMAINDER)
    sub.add_parser("where", help="print the credentials file's path")
    args = parser.parse_args(argv)
    try:
        if args.command == "where":
            load()
            print(folder() / FILE_NAME)
            return 0
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not cmd:
            parser.error("exec needs a command")
        exec_with_prefect_auth(cmd)
    except CredentialsError as exc:
        return console.fail(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
