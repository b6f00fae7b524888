"""The registered model's one format, and the only loader the pipeline trusts.

A version is a pyfunc whose `loader_module` is this installed package's
`vae_mlops.pyfunc`, with no code in the artifact (no `code/`, no `python_model`,
no models-from-code file) and one data folder, `data/vae/`, holding the VAE's
`state_dict` (`torch.save`) and its config as JSON.

A shared store is not trusted: anyone who can write to it can plant an MLmodel
whose loader, code paths or pickles run code in the process that loads it, and
`mlflow.pyfunc.load_model` obeys the MLmodel. So nothing here hands a stored
model to MLflow's loader. `verify` compares the stored MLmodel and file list
with exactly what `log_vae` writes, `load_vae` then downloads only the weights
(`torch.load(weights_only=True)`) and the config, and `load_pyfunc` /
`materialise` rebuild a local pyfunc folder from those two files and the
installed code. Anything else is an `UnsafeModelError` naming the difference.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass, fields
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import mlflow
import torch
import yaml
from mlflow import MlflowClient
from mlflow.models import ModelSignature
from mlflow.types import ParamSchema, ParamSpec

from vae_mlops.errors import VaeMlopsError
from vae_mlops.model import VAE, VAEConfig
from vae_mlops.tracking import mlflow_internals
from vae_mlops.tracking.store import use_store

if TYPE_CHECKING:
    from vae_mlops.tracking.runs import PipelineRun

FORMAT = "vae-mlops/state-dict/v2"  # MLmodel `metadata.vae_mlops_format`
FORMAT_KEY = "vae_mlops_format"
LOADER_MODULE = "vae_mlops.pyfunc"  # imported from the installed package, never from the artifact
DATA_DIR = "vae"  # the pyfunc's data: `data/vae/` in the model folder
WEIGHTS_FILE = "vae_state_dict.pt"
CONFIG_FILE = "vae_config.json"
SOURCE_FILE = "source.json"  # written only into a local, materialised folder: which version it is
MODEL_ARTIFACT = "vae"  # the logged model's name inside its run
OUTPUTS = ("reconstruction", "mu", "log_std", "elbo")  # the inference param `output`
DEFAULT_OUTPUT = "reconstruction"
# What `log_vae` writes, and nothing more. The pyfunc keys MLflow adds itself are listed; `code`
# must be absent or null, `loader_module` and `data` exactly ours.
TOP_LEVEL_FILES = frozenset(
    {"MLmodel", "conda.yaml", "python_env.yaml", "requirements.txt", "input_example.json",
     "serving_input_example.json", "registered_model_meta", "data"}
)  # fmt: skip
PYFUNC_KEYS = frozenset({"loader_module", "data", "code", "env", "python_version", "streamable"})
MAX_BYTES = {CONFIG_FILE: 64 * 1024, WEIGHTS_FILE: 2 * 1024**3}


class UnsafeModelError(VaeMlopsError):
    """A stored model is not exactly this project's format: it is refused, never loaded."""


@dataclass(frozen=True)
class ModelFiles:
    """Where a verified version keeps its two files, relative to its artifact root."""

    weights: str
    config: str


# ---------------------------------------------------------------- writing


def _write_data(folder: Path, vae: VAE, source: dict[str, str | None] | None = None) -> Path:
    """The pyfunc's data folder: weights and config (and, for a local copy, which version it is)."""

    folder.mkdir(parents=True)
    torch.save({k: v.detach().cpu() for k, v in vae.state_dict().items()}, folder / WEIGHTS_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps(vae.config.to_dict(), indent=2, sort_keys=True))
    if source is not None:
        (folder / SOURCE_FILE).write_text(json.dumps(source, indent=2, sort_keys=True))
    return folder


def _pip_requirements() -> list[str]:
    return [f"{name}=={metadata.version(name)}" for name in ("mlflow", "torch", "numpy", "vae-mlops")]


def log_vae(
    run: PipelineRun,
    vae: VAE,
    input_example: Any,
    tags: dict[str, str],
    metrics: dict[str, float] | None = None,
) -> str:
    """Log `vae` in this format into the pipeline's run; returns `models:/<model_id>`.

    `metrics` (the test metrics) are linked to the logged model, so MLflow 3's model page shows them.
    """

    with tempfile.TemporaryDirectory(prefix="vae-model-") as tmp:
        data = _write_data(Path(tmp) / DATA_DIR, vae)
        with use_store(run.uri), mlflow.start_run(run_id=run.run_id):  # log_model logs into the active run
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT,
                loader_module=LOADER_MODULE,
                data_path=str(data),
                signature=model_signature(),
                input_example=input_example,
                pip_requirements=_pip_requirements(),
                metadata={FORMAT_KEY: FORMAT},
                tags=tags,
            )
            if metrics:
                mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, model_id=info.model_id)
    return info.model_uri


def model_signature():
    """The inference param `output` (see `OUTPUTS`); the input, (N, 784) floats in [0, 1], is the input example.

    No input schema on purpose: MLflow would reject an empty batch or a string with
    its own schema message; `pyfunc.check_images` names each problem instead.
    """

    return ModelSignature(params=ParamSchema([ParamSpec("output", "string", DEFAULT_OUTPUT)]))


# ---------------------------------------------------------------- finding


def run_model_uri(run_id: str, tracking_uri: str) -> str | None:
    """`models:/<model_id>` of the last VAE logged by the pipeline run `run_id`, or None."""

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    outputs = client.get_run(run_id).outputs
    for out in reversed(outputs.model_outputs if outputs else []):
        if client.get_logged_model(out.model_id).name == MODEL_ARTIFACT:
            return f"models:/{out.model_id}"
    return None


def registered_version(model_uri: str, tracking_uri: str) -> dict[str, str | None] | None:
    """{model_name, version, model_id} of `models:/NAME/VERSION` or `models:/NAME@ALIAS`; None for other URIs."""

    if not model_uri.startswith("models:/") or model_uri.startswith("models:/m-"):
        return None
    name, sep, alias = model_uri[len("models:/") :].partition("@")
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    if sep:
        mv = client.get_model_version_by_alias(name, alias)
    else:
        name, _, version = name.rpartition("/")
        mv = client.get_model_version(name, version)
    source = str(mv.source or "")  # MLflow 3 registers `models:/<model_id>`
    model_id = getattr(mv, "model_id", None) or (source[len("models:/") :] if source.startswith("models:/m-") else None)
    return {"model_name": mv.name, "version": str(mv.version), "model_id": model_id}


def _artifact_root(model_uri: str, tracking_uri: str) -> str:
    """The concrete artifact URI (file://, mlflow-artifacts:/, s3://...) of a `models:/` or `runs:/` URI."""
    with use_store(tracking_uri):
        return mlflow_internals.artifact_root(model_uri)


def _download(root: str, relative: str, dst: Path, tracking_uri: str) -> Path:


    with use_store(tracking_uri):
        uri = f"{root.rstrip('/')}/{relative}"
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))


def _listing(root: str, relative: str, tracking_uri: str) -> dict[str, tuple[bool, int | None]]:
    """name -> (is_dir, size) of the artifacts directly under `root/relative`."""

    with use_store(tracking_uri):
        found = mlflow.artifacts.list_artifacts(artifact_uri=f"{root.rstrip('/')}/{relative}".rstrip("/"))
    return {PurePosixPath(f.path).name: (bool(f.is_dir), f.file_size) for f in found}


# ---------------------------------------------------------------- checking and reading


def mlmodel_problems(mlmodel: Any) -> list[str]:
    """How an MLmodel (parsed YAML) differs from what `log_vae` writes; empty when it is exactly ours."""
    if not isinstance(mlmodel, dict):
        return ["its MLmodel file is not a mapping"]
    flavors = mlmodel.get("flavors") or {}
    pyfunc = flavors.get("python_function") or {}
    problems = []
    found = (mlmodel.get("metadata") or {}).get(FORMAT_KEY)
    if found != FORMAT:
        problems.append(f"metadata.{FORMAT_KEY} is {found!r}, not {FORMAT!r}")
    if set(flavors) != {"python_function"}:
        problems.append(f"flavors {sorted(flavors)} (this format has python_function only)")
    if not isinstance(pyfunc, dict):
        return [*problems, "its python_function flavor is not a mapping"]
    if pyfunc.get("loader_module") != LOADER_MODULE:
        problems.append(f"loader_module is {pyfunc.get('loader_module')!r}, not {LOADER_MODULE!r}")
    if pyfunc.get("code"):
        problems.append(f"it ships code ({pyfunc['code']!r}) to put on sys.path")
    if pyfunc.get("data") != f"data/{DATA_DIR}":
        problems.append(f"its data is {pyfunc.get('data')!r}, not 'data/{DATA_DIR}'")
    extra = sorted(set(pyfunc) - PYFUNC_KEYS)
    if extra:
        problems.append(f"unexpected python_function keys {extra} (e.g. python_model, model_code_path, artifacts)")
    return problems


def listing_problems(top: dict[str, tuple[bool, int | None]], data: dict[str, tuple[bool, int | None]]) -> list[str]:
    """How the stored files differ from what `log_vae` writes: no extra file or folder anywhere, sizes in bounds."""
    problems = [f"unexpected {'folder' if d else 'file'} {name!r}" for name, (d, _) in sorted(top.items())
                if name not in TOP_LEVEL_FILES]  # fmt: skip
    if set(data) != set(MAX_BYTES):
        problems.append(f"data/{DATA_DIR}/ holds {sorted(data)}, not {sorted(MAX_BYTES)}")
    for name, limit in MAX_BYTES.items():
        is_dir, size = data.get(name, (False, 0))
        if is_dir or (size is not None and size > limit):
            problems.append(f"data/{DATA_DIR}/{name} is {'a folder' if is_dir else f'{size} bytes'} (limit {limit})")
    return problems


def _refuse(model_uri: str, problems: list[str]) -> UnsafeModelError:
    return UnsafeModelError(
        f"{model_uri} is not a VAE logged by this pipeline ({'; '.join(problems)}). It was not loaded: loading it "
        "could run code from the store. Move the alias back to a version this pipeline logged with "
        "`make rollback VERSION=<n> REASON=...` (`make history` lists them) or register a new one with "
        "`dvc repro -f register`."
    )


def verify(model_uri: str, tracking_uri: str) -> ModelFiles:
    """Check that `model_uri` is exactly this format, reading only its MLmodel and file list.

    Cheap enough for the gate to run on every champion before comparing.
    """
    return _verify_root(_artifact_root(model_uri, tracking_uri), model_uri, tracking_uri)


def _verify_root(root: str, model_uri: str, tracking_uri: str) -> ModelFiles:
    with tempfile.TemporaryDirectory(prefix="vae-mlmodel-") as tmp:
        try:
            mlmodel = yaml.safe_load(_download(root, "MLmodel", Path(tmp), tracking_uri).read_text())
            top = _listing(root, "", tracking_uri)
            data = _listing(root, f"data/{DATA_DIR}", tracking_uri)
        except Exception as exc:  # no MLmodel at all, not YAML, an unreadable store
            raise UnsafeModelError(
                f"{model_uri} has no readable MLmodel file ({type(exc).__name__}: {str(exc)[:200]}); it was not "
                "loaded. Point the alias at a version logged by this pipeline, or register a new one."
            ) from None
    problems = mlmodel_problems(mlmodel)
    problems += listing_problems(top, data) if not problems else []
    if problems:
        raise _refuse(model_uri, problems)
    return ModelFiles(f"data/{DATA_DIR}/{WEIGHTS_FILE}", f"data/{DATA_DIR}/{CONFIG_FILE}")


def vae_from_files(weights_path: Path, config_path: Path, source: str = "") -> VAE:
    """Rebuild the VAE from a state_dict file and a config JSON, with this package's code only."""

    where = source or str(weights_path.parent)
    try:
        raw = json.loads(Path(config_path).read_text())
        config = VAEConfig(**{f.name: raw[f.name] for f in fields(VAEConfig) if f.name in raw})
        if not all(isinstance(getattr(config, k), int) for k in ("input_dim", "hidden_dim", "latent_dim")):
            raise TypeError("input_dim, hidden_dim and latent_dim must be integers")
        vae = VAE(config)  # an unknown likelihood fails here
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UnsafeModelError(f"{where}: its {CONFIG_FILE} is not a VAE config ({exc}); it was not loaded") from None
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        raise UnsafeModelError(
            f"{where}: its {WEIGHTS_FILE} is not a plain tensor state_dict ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}); it was refused without unpickling"
        ) from None
    try:
        vae.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise UnsafeModelError(f"{where}: its weights do not fit its config ({str(exc)[:300]})") from None
    return vae.eval()


def load_vae(model_uri: str, tracking_uri: str) -> VAE:
    """The VAE of `model_uri` from its weights and config only; `UnsafeModelError` for any other format."""
    root = _artifact_root(model_uri, tracking_uri)  # resolved once: an alias that moves meanwhile cannot mix versions
    files = _verify_root(root, model_uri, tracking_uri)
    with tempfile.TemporaryDirectory(prefix="vae-weights-") as tmp:
        weights = _download(root, files.weights, Path(tmp) / "w", tracking_uri)
        config = _download(root, files.config, Path(tmp) / "c", tracking_uri)
        return vae_from_files(weights, config, source=model_uri)


# ---------------------------------------------------------------- a local, trusted copy


def save_local(vae: VAE, dst: Path, source: dict[str, str | None] | None = None) -> Path:
    """A pyfunc folder at `dst` written by this process: installed loader, the VAE's weights and config.

    Written beside `dst` and renamed into place, so a reader never sees half a folder.
    """

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".vae-local-", dir=dst.parent) as tmp:
        data = _write_data(Path(tmp) / "data-src" / DATA_DIR, vae, source)
        staged = Path(tmp) / "model"
        mlflow.pyfunc.save_model(
            path=str(staged),
            loader_module=LOADER_MODULE,
            data_path=str(data),
            signature=model_signature(),
            pip_requirements=_pip_requirements(),
            metadata={FORMAT_KEY: FORMAT},
        )
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(staged, dst)
    return dst


def materialise(model_uri: str, tracking_uri: str, dst: Path) -> Path:
    """Verify `model_uri`, read its weights only, and write a local pyfunc folder of it at `dst`.

    A registry URI (`models:/NAME@ALIAS`, `models:/NAME/VERSION`) is pinned to its version first,
    and the folder remembers the version, so answers served from it name it.
    """
    source = registered_version(model_uri, tracking_uri)
    pinned = f"models:/{source['model_name']}/{source['version']}" if source else model_uri
    return save_local(load_vae(pinned, tracking_uri), dst, source)


def load_pyfunc(model_uri: str, tracking_uri: str | None = None):
    """The one safe way to load a version as a pyfunc: `model.predict(x, params={"output": "mu"})`.

    Unlike `mlflow.pyfunc.load_model(model_uri)`, which runs whatever loader and code the
    stored MLmodel names, this verifies the version and rebuilds it from its weights and
    the installed code. `tracking_uri` defaults to MLflow's (`MLFLOW_TRACKING_URI`).
    """

    uri = tracking_uri or mlflow.get_tracking_uri()
    with tempfile.TemporaryDirectory(prefix="vae-pyfunc-") as tmp:
        return mlflow.pyfunc.load_model(str(materialise(model_uri, uri, Path(tmp) / "model")))
