"""`make serve-model`: MLflow's scoring server on a local copy of the champion, rebuilt from verified weights.

`mlflow models serve -m models:/NAME@ALIAS` would load the stored MLmodel as it stands, with
whatever loader and code it names. Here the version is verified first (`model_store.verify`),
only its weights and config are read, and the folder MLflow serves is written by this process
with the installed `vae_mlops.pyfunc` as its loader. MLflow's scoring app then serves it under
uvicorn, as `mlflow models serve --env-manager local` would (`serving_app`). The served model
follows the alias itself (`VAE_SERVE_FOLLOW`), verifying each new version the same way.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from vae_mlops import inference_log, model_store, pyfunc, serving_app
from vae_mlops.paths import Paths

DEFAULT_PORT = 5080  # apart from `make ui` (5000) and the team stack's MLflow (5001) and Prefect (4200)
# The team stack exports a read-only MLflow account for the scoring server (`make services`).
ENV_SERVE_USER, ENV_SERVE_PASSWORD = "VAE_SERVE_MLFLOW_USERNAME", "VAE_SERVE_MLFLOW_PASSWORD"
KEPT_SECRETS = ("MLFLOW_TRACKING_PASSWORD", inference_log.ENV_PASSWORD)  # what the server itself needs


def server_env(base: dict[str, str]) -> dict[str, str]:
    """The scoring server's environment: the read-only MLflow account when there is one, no other secret.

    The server reads the registry and inserts into the inference table; it never needs the
    pipeline's writer password, the Prefect auth string or a database admin's password.
    """
    env = dict(base)
    if env.get(ENV_SERVE_USER):
        env["MLFLOW_TRACKING_USERNAME"] = env[ENV_SERVE_USER]
        env["MLFLOW_TRACKING_PASSWORD"] = env.get(ENV_SERVE_PASSWORD, "")
    for key in list(env):
        secret = any(mark in key for mark in ("PASSWORD", "AUTH_STRING", "TOKEN", "SECRET", "CREDENTIAL"))
        if secret and key not in KEPT_SECRETS:
            del env[key]
    return env


def serve_command(host: str, port: int) -> list[str]:
    """MLflow's scoring app as `mlflow models serve --env-manager local` runs it (uvicorn), guarded."""
    return [sys.executable, "-m", "uvicorn", "--host", host, "--port", str(port), "--no-access-log",
            "vae_mlops.serving_app:app"]  # fmt: skip


def prepare(name: str, alias: str, tracking_uri: str, paths: Paths) -> Path:
    """The champion's local folder under `.serving/` (0700): verified, weights only, installed loader."""
    folder = paths.serving_dir
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    print(f"verifying models:/{name}@{alias} in {_redacted(tracking_uri)} ...", file=sys.stderr, flush=True)
    return model_store.materialise(f"models:/{name}@{alias}", tracking_uri, folder / f"{name}@{alias}")


def serve(name: str, alias: str, tracking_uri: str, paths: Paths, host: str, port: int, poll_s: float) -> None:
    """Replace this process with the scoring server on the verified champion; it follows `name@alias`."""
    env = server_env(dict(os.environ))
    os.environ.clear()
    os.environ.update(env)  # the champion is read as the read-only account too
    model_dir = prepare(name, alias, tracking_uri, paths)
    env.update({
        "MLFLOW_TRACKING_URI": tracking_uri,
        "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
        pyfunc.ENV_FOLLOW: f"{name}@{alias}",
        pyfunc.ENV_POLL_S: str(poll_s),
        serving_app.ENV_MODEL_DIR: str(model_dir),
        pyfunc.ENV_RECORD: "1",
    })  # fmt: skip
    env.setdefault(inference_log.ENV_URL, inference_log.writer_url(paths.root))
    cmd = serve_command(host, port)
    print(f"serving {model_dir} on http://{host}:{port} (follows {name}@{alias})", file=sys.stderr, flush=True)
    os.execve(cmd[0], cmd, env)


def _redacted(uri: str) -> str:
    """A tracking URI fit for a log line: no password."""

    parts = urlsplit(uri)
    if parts.password:
        parts = parts._replace(netloc=f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else ""))
    return urlunsplit(parts)
