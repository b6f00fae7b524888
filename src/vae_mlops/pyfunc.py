"""The served VAE: MLflow's `loader_module` for this project's models, chosen by the inference param `output`.

    model = model_store.load_pyfunc("models:/vae-mnist@champion")   # verified; installed code only
    x = images.reshape(-1, 784).astype("float32") / 255           # (N, 784) on [0, 1]
    out = model.predict(x)                                         # reconstruction: (N, 784), decoded z = mu
    out = model.predict(x, params={"output": "mu"})                # (N, latent_dim); "log_std" likewise
    out = model.predict(x, params={"output": "elbo"})              # (N,) ELBO in nats; low = unlike training data
    out["values"], out["version"]                                  # the answer, and the registry version that gave it

MLflow imports this module from the installed package (the MLmodel's `loader_module`)
and calls `_load_pyfunc` on the folder's `data/vae/`: weights through
`torch.load(weights_only=True)`, never a pickle, never code from the store. With
`VAE_SERVE_FOLLOW=<name>@<alias>` set, the model follows the alias: every
`VAE_SERVE_POLL_S` seconds it reads which version the alias names and, when that
changes, verifies and loads the new weights beside the old ones and swaps them in one
reference assignment; a request in flight finishes on the weights it started with.

Bad input raises `MlflowException` (INVALID_PARAMETER_VALUE), which the scoring
server answers with HTTP 400 and the message; it names the problem and the limit.
"""

from __future__ import annotations

import base64
import binascii
import json
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
from mlflow.exceptions import MlflowException

from vae_mlops import inference_log, model_store
from vae_mlops.model_store import DEFAULT_OUTPUT, OUTPUTS
from vae_mlops.model import VAE, elbo

INPUT_DIM = 784
MAX_ROWS = 1024  # images per request; at ~5 characters a value the JSON body is then about 4 MB
ELBO_SEED = 0  # the single-sample ELBO's one noise row: an image gets the same score in any batch
ENV_FOLLOW = "VAE_SERVE_FOLLOW"  # "<registered model>@<alias>", e.g. "vae-mnist@champion"
ENV_POLL_S = "VAE_SERVE_POLL_S"
ENV_RECORD = "VAE_SERVE_RECORD"  # "1" under `serve-model`: record every answered image (inference_log)
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

    return MlflowException.invalid_parameter_value(message)


def check_output(params: dict[str, Any] | None) -> str:
    output = (params or {}).get("output") or DEFAULT_OUTPUT
    if output not in OUTPUTS:
        raise bad_input(f"unknown output {output!r}: use one of {', '.join(OUTPUTS)} (params.output)")
    return str(output)


def check_images(model_input: Any) -> np.ndarray:
    """(N, 784) float32 on [0, 1], 1 <= N <= MAX_ROWS, or a 400 that says what is wrong.

    An image comes as a row of 784 numbers in [0, 1], or as one string: the base64 of its
    784 bytes (grey values 0-255), the compact form (`encode_images` writes it).
    """
    if hasattr(model_input, "to_numpy"):  # a DataFrame, from `dataframe_split` input
        model_input = model_input.to_numpy()
    try:
        x = np.asarray(model_input)
    except (ValueError, TypeError) as exc:
        raise bad_input(f"input is not a rectangular array of numbers ({exc})") from None
    if _is_string_column(x):
        return decode_images(x.reshape(-1)).astype(np.float32) / np.float32(255)
    if x.dtype.kind not in "fiub":
        found = "strings" if x.dtype.kind in "SU" else "nulls, strings or nested lists"
        raise bad_input(
            f"input must be numbers in [0, 1], or one base64 string of 784 bytes per image; found {found} "
            f"({x.dtype} array of shape {x.shape})"
        )
    if x.size == 0:
        raise bad_input("empty batch: send at least one image, a row of 784 values in [0, 1]")
    if x.ndim != 2 or x.shape[1] != INPUT_DIM:
        raise bad_input(f"each row must hold {INPUT_DIM} values (a flattened 28x28 image); got shape {x.shape}")
    _check_count(x.shape[0])
    x = x.astype(np.float32, copy=False)
    finite = np.isfinite(x)
    if not finite.all():
        row = int(np.argwhere(~finite)[0][0])
        raise bad_input(f"NaN or inf in the input (first in row {row}): pixel values must be finite, in [0, 1]")
    if x.min() < 0 or x.max() > 1:
        raise bad_input(f"pixel values must lie in [0, 1] (grey / 255); got min {x.min():g}, max {x.max():g}")
    return x


def _check_count(n: int) -> None:
    if n > MAX_ROWS:
        raise bad_input(f"{n} images in one request: the limit is {MAX_ROWS}; split the batch")


def _is_string_column(x: np.ndarray) -> bool:
    """One string per image: a list of strings, or a one-column table of them."""
    if x.ndim == 2 and x.shape[1] == 1:
        x = x[:, 0]
    return x.ndim == 1 and x.size > 0 and (x.dtype.kind in "SU" or all(isinstance(v, str) for v in x[:1]))


B64_CHARS = 4 * -(-INPUT_DIM // 3)  # 1048: 784 bytes in base64, with 2 padding characters
_PAD = INPUT_DIM % 3 and 3 - INPUT_DIM % 3


def encode_images(images: np.ndarray) -> list[str]:
    """(N, 784) uint8 grey values -> one base64 string each: what a client sends instead of floats."""

    return [base64.b64encode(row.tobytes()).decode("ascii") for row in np.ascontiguousarray(images, dtype=np.uint8)]


def decode_images(strings: np.ndarray) -> np.ndarray:
    """(N,) base64 strings of 784 bytes -> (N, 784) uint8, decoded in one call (no per-image Python)."""

    _check_count(len(strings))
    try:
        text = "".join(strings.tolist()).encode("ascii")
    except (TypeError, UnicodeEncodeError):
        raise bad_input("an image string is not ASCII base64 (or the column mixes strings with other values)") from None
    if len(text) != B64_CHARS * len(strings):
        lengths = np.char.str_len(strings.astype(str))
        row = int(np.argmax(lengths != B64_CHARS))
        raise bad_input(
            f"image {row}: base64 of {INPUT_DIM} bytes is {B64_CHARS} characters; got {int(lengths[row])} "
            "(a flattened 28x28 image, one byte per pixel)"
        )
    chars = np.frombuffer(text, dtype=np.uint8).reshape(len(strings), B64_CHARS).copy()
    if _PAD:  # padding only at each image's end; replaced, so the whole batch decodes as one string
        if not (chars[:, -_PAD:] == ord("=")).all():
            row = int(np.argmax(~(chars[:, -_PAD:] == ord("=")).all(axis=1)))
            raise bad_input(f"image {row}: not the base64 of {INPUT_DIM} bytes (it must end with {'=' * _PAD})")
        chars[:, -_PAD:] = ord("A")
    try:
        raw = base64.b64decode(chars.tobytes(), validate=True)
    except binascii.Error as exc:
        raise bad_input(f"an image is not valid base64 ({exc}); send the base64 of its 784 bytes") from None
    return np.frombuffer(raw, dtype=np.uint8).reshape(len(strings), -1)[:, :INPUT_DIM]


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


class VAEModel:
    """The pyfunc `_load_pyfunc` returns: validates input, answers with the current weights, follows an alias."""

    def __init__(self, served: Served, recorder: inference_log.Recorder | None = None) -> None:
        self._served = served
        self._recorder = recorder  # what the scoring server answered, for the monitor (inference_log)
        self._lock = threading.Lock()  # one reload at a time
        follow = os.environ.get(ENV_FOLLOW, "").strip()
        if follow:
            self._start_following(follow)

    def predict(self, model_input, params: dict[str, Any] | None = None) -> dict[str, Any]:
        output = check_output(params)
        x = check_images(model_input)
        served = self._served  # one read: a swap mid-request cannot mix two versions
        values = compute(served.vae, x, output)
        if self._recorder is not None:  # only answered requests: a refused one raised above
            self._recorder.record(served.vae, x, model_name=served.model_name, version=served.version)
        return {
            "output": output,
            "model_name": served.model_name,
            "version": served.version,
            "model_id": served.model_id,
            "values": values,
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


def _load_pyfunc(data_path: str) -> VAEModel:
    """MLflow's `loader_module` entry point: the VAE from `data/vae/` of a folder `model_store` wrote."""
    folder = Path(data_path)
    vae = model_store.vae_from_files(folder / model_store.WEIGHTS_FILE, folder / model_store.CONFIG_FILE)
    source_file = folder / model_store.SOURCE_FILE
    source = json.loads(source_file.read_text()) if source_file.is_file() else {}
    recorder = inference_log.Recorder.from_env() if os.environ.get(ENV_RECORD) == "1" else None
    return VAEModel(Served(vae, source.get("model_name"), source.get("version"), source.get("model_id")), recorder)


def _say(message: str) -> None:
    """One line on stderr: the scoring server's log shows which version serves."""
    print(f"vae_mlops.pyfunc: {message}", file=sys.stderr, flush=True)
