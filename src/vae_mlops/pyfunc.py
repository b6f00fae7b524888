"""The registered model as MLflow runs it: a pyfunc over the VAE, chosen by the inference param `output`.

    model = mlflow.pyfunc.load_model("models:/vae-mnist@champion")
    x = images.reshape(-1, 784).astype("float32") / 255           # (N, 784) on [0, 1]
    out = model.predict(x)                                         # reconstruction: (N, 784), decoded z = mu
    out = model.predict(x, params={"output": "mu"})                # (N, latent_dim); "log_std" likewise
    out = model.predict(x, params={"output": "elbo"})              # (N,) ELBO in nats; low = unlike training data
    out["values"], out["version"]                                  # the answer, and the registry version that gave it

The weights come from the model's own artifacts (`model_store.vae_from_files`:
`torch.load(weights_only=True)`), never from a pickle. Under `mlflow models serve`
with `VAE_SERVE_FOLLOW=<name>@<alias>` set, the model follows the alias: every
`VAE_SERVE_POLL_S` seconds it reads which version the alias names and, when that
changes, loads the new weights beside the old ones and swaps them in one
reference assignment; a request in flight finishes on the weights it started with.

Bad input raises `MlflowException` (INVALID_PARAMETER_VALUE), which the scoring
server answers with HTTP 400 and the message; it names the problem and the limit.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
import yaml

from vae_mlops import model_store
from vae_mlops.model import VAE, elbo

OUTPUTS = ("reconstruction", "mu", "log_std", "elbo")
DEFAULT_OUTPUT = "reconstruction"
INPUT_DIM = 784
MAX_ROWS = 1024  # images per request; at ~5 characters a value the JSON body is then about 4 MB
ELBO_SEED = 0  # the single-sample ELBO's one noise row: an image gets the same score in any batch
ENV_FOLLOW = "VAE_SERVE_FOLLOW"  # "<registered model>@<alias>", e.g. "vae-mnist@champion"
ENV_POLL_S = "VAE_SERVE_POLL_S"
DEFAULT_POLL_S = 10.0

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Served:
    """What answers requests now; replaced whole, never mutated."""

    vae: VAE
    model_name: str | None
    version: str | None  # the registry version, when known
    model_id: str | None  # the logged model (MLflow 3's `models:/<model_id>`)


def bad_input(message: str) -> Exception:
    from mlflow.exceptions import MlflowException

    return MlflowException.invalid_parameter_value(message)


def check_output(params: dict[str, Any] | None) -> str:
    output = (params or {}).get("output") or DEFAULT_OUTPUT
    if output not in OUTPUTS:
        raise bad_input(f"unknown output {output!r}: use one of {', '.join(OUTPUTS)} (params.output)")
    return str(output)


def check_images(model_input: Any) -> np.ndarray:
    """(N, 784) float32 on [0, 1], 1 <= N <= MAX_ROWS, or a 400 that says what is wrong."""
    if hasattr(model_input, "to_numpy"):  # a DataFrame, from `dataframe_split` input
        model_input = model_input.to_numpy()
    try:
        x = np.asarray(model_input)
    except (ValueError, TypeError) as exc:
        raise bad_input(f"input is not a rectangular array of numbers ({exc})") from None
    if x.dtype.kind not in "fiub":
        found = "strings" if x.dtype.kind in "SU" else "nulls, strings or nested lists"
        raise bad_input(f"input must be numbers in [0, 1]; found {found} ({x.dtype} array)")
    if x.size == 0:
        raise bad_input("empty batch: send at least one image, a row of 784 values in [0, 1]")
    if x.ndim != 2 or x.shape[1] != INPUT_DIM:
        raise bad_input(f"each row must hold {INPUT_DIM} values (a flattened 28x28 image); got shape {x.shape}")
    if x.shape[0] > MAX_ROWS:
        raise bad_input(f"{x.shape[0]} images in one request: the limit is {MAX_ROWS}; split the batch")
    x = x.astype(np.float32, copy=False)
    finite = np.isfinite(x)
    if not finite.all():
        row = int(np.argwhere(~finite)[0][0])
        raise bad_input(f"NaN or inf in the input (first in row {row}): pixel values must be finite, in [0, 1]")
    if x.min() < 0 or x.max() > 1:
        raise bad_input(f"pixel values must lie in [0, 1] (grey / 255); got min {x.min():g}, max {x.max():g}")
    return x


@torch.no_grad()
def compute(vae: VAE, x: np.ndarray, output: str) -> np.ndarray:
    """The answer for `output` from the model's own maths (`model.py`)."""
    xt = torch.from_numpy(x)
    if output == "elbo":
        return elbo(vae, xt, eps=elbo_noise(vae.config.latent_dim)).numpy()  # (N,)
    mu, log_std = vae.encode(xt)  # (N, L) each
    if output == "mu":
        return mu.numpy()
    if output == "log_std":
        return log_std.numpy()
    return vae.decode(mu).numpy()  # (N, 784) pixel means in [0, 1]


def elbo_noise(latent_dim: int) -> torch.Tensor:
    """(1, latent_dim) standard normal noise from `ELBO_SEED`, shared by every image of every request."""
    return torch.randn((1, latent_dim), generator=torch.Generator().manual_seed(ELBO_SEED))


class VAEModel(mlflow.pyfunc.PythonModel):
    """The pyfunc `served_model.py` sets: validates input, answers with the current weights, follows an alias."""

    def load_context(self, context) -> None:
        weights = Path(context.artifacts[model_store.WEIGHTS])
        vae = model_store.vae_from_files(weights, Path(context.artifacts[model_store.CONFIG]))
        self._served = Served(vae, None, None, _model_id(weights))
        self._lock = threading.Lock()  # one reload at a time
        follow = os.environ.get(ENV_FOLLOW, "").strip()
        if follow:
            self._start_following(follow)

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> dict[str, Any]:
        output = check_output(params)
        x = check_images(model_input)
        served = self._served  # one read: a swap mid-request cannot mix two versions
        return {
            "output": output,
            "model_name": served.model_name,
            "version": served.version,
            "model_id": served.model_id,
            "values": compute(served.vae, x, output),
        }

    # ------------------------------------------------------------ following an alias

    def _start_following(self, follow: str) -> None:
        name, sep, alias = follow.rpartition("@")
        if not sep or not name or not alias:
            raise ValueError(f"{ENV_FOLLOW}={follow!r}: expected <registered model>@<alias>, e.g. vae-mnist@champion")
        poll_s = float(os.environ.get(ENV_POLL_S, DEFAULT_POLL_S))
        self._tracking_uri = mlflow.get_tracking_uri()
        self._client = mlflow.MlflowClient(tracking_uri=self._tracking_uri, registry_uri=self._tracking_uri)
        _say(f"following {name}@{alias} in {self._tracking_uri}, every {poll_s:g}s")
        thread = threading.Thread(target=self._follow, args=(name, alias, poll_s), name="vae-follow", daemon=True)
        self._follow_once(name, alias, None)  # label the first answers with their version
        thread.start()

    def _follow(self, name: str, alias: str, poll_s: float) -> None:
        problem = None
        while True:
            time.sleep(poll_s)
            problem = self._follow_once(name, alias, problem)

    def _follow_once(self, name: str, alias: str, problem: str | None) -> str | None:
        """One look at the alias; a failure keeps the current weights serving and is said once, not every poll."""
        try:
            self.refresh(name, alias)
            return None
        except Exception as exc:  # the store is down, or the new version is refused
            now = f"{type(exc).__name__}: {str(exc)[:300]}"
            if now != problem:
                serving = f"v{self._served.version}" if self._served.version else "the weights it was started with"
                _say(f"still serving {serving}: {now}")
            return now

    def refresh(self, name: str, alias: str) -> bool:
        """Serve the version `alias` names now; True when the weights changed."""
        with self._lock:
            mv = self._client.get_model_version_by_alias(name, alias)
            current = self._served
            version = str(mv.version)
            if version == current.version:
                return False
            source = str(mv.source or "")  # MLflow 3 registers `models:/<model_id>`
            model_id = getattr(mv, "model_id", None) or (source[8:] if source.startswith("models:/m-") else None)
            if current.version is None and model_id and model_id == current.model_id:
                self._served = Served(current.vae, name, version, model_id)  # the bundled weights are this version
                _say(f"serving {name} v{version} ({alias})")
                return False
            vae = model_store.load_vae(f"models:/{name}/{version}", self._tracking_uri)
            self._served = Served(vae, name, version, model_id)
            was = f"v{current.version}" if current.version else "the weights it was started with"
            _say(f"now serving {name} v{version} ({alias}; was {was})")
            return True


def _model_id(weights: Path) -> str | None:
    """The logged model's id from the MLmodel beside the artifacts (`<model>/artifacts/<file>`)."""
    try:
        return yaml.safe_load((weights.parent.parent / "MLmodel").read_text()).get("model_id")
    except (OSError, AttributeError, yaml.YAMLError):
        return None


def _say(message: str) -> None:
    """One line on stderr: the scoring server's log shows which version serves."""
    print(f"vae_mlops.pyfunc: {message}", file=sys.stderr, flush=True)
