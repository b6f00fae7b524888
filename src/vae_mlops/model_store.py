"""The registered model's one format, and the only loader the pipeline trusts.

A version is a models-from-code pyfunc (`served_model.py` + the package as
`code_paths`) with two artifacts: the VAE's `state_dict` (`torch.save`) and its
config as JSON. `mlflow.pyfunc.load_model("models:/vae-mnist@champion")` runs with
`MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false`, since nothing in it is a pickle.

The pipeline itself (the gate's re-scoring, the served model's reloads) never
goes through pyfunc: `load_vae` reads the MLmodel file as YAML, downloads only the
weights and the config, and rebuilds the VAE with this installed package's code
(`torch.load(weights_only=True)`, no unpickling, no code from the store). Anything
else (an old pickled `mlflow.pytorch` model, a planted file) is an `UnsafeModelError`.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import fields
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import yaml

from vae_mlops.errors import VaeMlopsError
from vae_mlops.model import VAE, VAEConfig

if TYPE_CHECKING:
    from vae_mlops.tracking import PipelineRun

FORMAT = "vae-mlops/state-dict/v1"  # MLmodel `metadata.vae_mlops_format`
FORMAT_KEY = "vae_mlops_format"
WEIGHTS = "weights"  # pyfunc artifact keys
CONFIG = "config"
WEIGHTS_FILE = "vae_state_dict.pt"
CONFIG_FILE = "vae_config.json"
MODEL_ARTIFACT = "vae"  # the logged model's name inside its run
MODEL_CODE = Path(__file__).with_name("served_model.py")  # what `mlflow.pyfunc.load_model` executes


class UnsafeModelError(VaeMlopsError):
    """A stored model is not in the weights-only format: it is refused, never loaded."""


# ---------------------------------------------------------------- writing


def log_vae(
    run: PipelineRun,
    vae: VAE,
    input_example: Any,
    tags: dict[str, str],
    metrics: dict[str, float] | None = None,
) -> str:
    """Log `vae` in the weights-only format into the pipeline's run; returns `models:/<model_id>`.

    `metrics` (the test metrics) are linked to the logged model, so MLflow 3's model page shows them.
    """
    import mlflow
    import torch

    import vae_mlops
    from vae_mlops.tracking import use_store

    with tempfile.TemporaryDirectory(prefix="vae-model-") as tmp:
        weights, config = Path(tmp) / WEIGHTS_FILE, Path(tmp) / CONFIG_FILE
        torch.save({k: v.detach().cpu() for k, v in vae.state_dict().items()}, weights)
        config.write_text(json.dumps(vae.config.to_dict(), indent=2, sort_keys=True))
        with use_store(run.uri), mlflow.start_run(run_id=run.run_id):  # log_model logs into the active run
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT,
                python_model=str(MODEL_CODE),
                artifacts={WEIGHTS: str(weights), CONFIG: str(config)},
                code_paths=[str(Path(vae_mlops.__file__).parent)],
                signature=model_signature(),
                input_example=input_example,
                pip_requirements=[
                    f"mlflow=={metadata.version('mlflow')}",
                    f"torch=={metadata.version('torch')}",
                    f"numpy=={metadata.version('numpy')}",
                ],
                metadata={FORMAT_KEY: FORMAT},
                tags=tags,
            )
            if metrics:
                mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, model_id=info.model_id)
    return info.model_uri


def model_signature():
    """The inference param `output` (see `pyfunc.OUTPUTS`); the input, (N, 784) floats in [0, 1], is the input example.

    No input schema on purpose: MLflow would reject an empty batch or a string with
    its own schema message; `pyfunc.check_images` names each problem instead.
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec

    from vae_mlops.pyfunc import DEFAULT_OUTPUT

    return ModelSignature(params=ParamSchema([ParamSpec("output", "string", DEFAULT_OUTPUT)]))


# ---------------------------------------------------------------- finding


def run_model_uri(run_id: str, tracking_uri: str) -> str | None:
    """`models:/<model_id>` of the last VAE logged by the pipeline run `run_id`, or None."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    outputs = client.get_run(run_id).outputs
    for out in reversed(outputs.model_outputs if outputs else []):
        if client.get_logged_model(out.model_id).name == MODEL_ARTIFACT:
            return f"models:/{out.model_id}"
    return None


def _artifact_root(model_uri: str, tracking_uri: str) -> str:
    """The concrete artifact URI (file://, mlflow-artifacts:/, s3://...) of a `models:/` or `runs:/` URI."""
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository
    from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository

    from vae_mlops.tracking import use_store

    with use_store(tracking_uri):
        if ModelsArtifactRepository.is_models_uri(model_uri):
            return ModelsArtifactRepository.get_underlying_uri(model_uri)
        if RunsArtifactRepository.is_runs_uri(model_uri):
            return RunsArtifactRepository.get_underlying_uri(model_uri)
    return model_uri


def _download(root: str, relative: str, dst: Path, tracking_uri: str) -> Path:
    import mlflow

    from vae_mlops.tracking import use_store

    with use_store(tracking_uri):
        uri = f"{root.rstrip('/')}/{relative}"
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))


# ---------------------------------------------------------------- checking and reading


def _artifact_paths(mlmodel: dict, model_uri: str) -> dict[str, str]:
    """{weights, config} -> relative path, when the MLmodel describes this format; else `UnsafeModelError`."""
    flavors = mlmodel.get("flavors") or {}
    pyfunc = flavors.get("python_function") or {}
    found = (mlmodel.get("metadata") or {}).get(FORMAT_KEY)
    problems = []
    if found != FORMAT:
        problems.append(f"metadata.{FORMAT_KEY} is {found!r}, not {FORMAT!r}")
    if set(flavors) != {"python_function"}:
        problems.append(f"flavors {sorted(flavors)} (a weights-only model has python_function only)")
    if "python_model" in pyfunc or "model_code_path" not in pyfunc:
        problems.append("its pyfunc is a pickled python_model, not models-from-code")
    artifacts = pyfunc.get("artifacts") or {}
    paths = {}
    for key, name in ((WEIGHTS, WEIGHTS_FILE), (CONFIG, CONFIG_FILE)):
        rel = str((artifacts.get(key) or {}).get("path", ""))
        if PurePosixPath(rel) != PurePosixPath("artifacts", name):
            problems.append(f"artifact {key!r} is {rel!r}, not 'artifacts/{name}'")
        paths[key] = f"artifacts/{name}"
    if problems:
        raise UnsafeModelError(
            f"{model_uri} is not a weights-only VAE ({'; '.join(problems)}). It was not loaded: loading it "
            "could run code from the store. Point the alias at a version logged by this pipeline "
            "(`python -m vae_mlops registry history` lists them) or register a new one with `dvc repro -f register`."
        )
    return paths


def verify(model_uri: str, tracking_uri: str) -> dict[str, str]:
    """Read only the MLmodel file of `model_uri` and check it is this format; {weights, config} -> path.

    Cheap enough for the gate to run on every champion before comparing.
    """
    return _verify_root(_artifact_root(model_uri, tracking_uri), model_uri, tracking_uri)


def _verify_root(root: str, model_uri: str, tracking_uri: str) -> dict[str, str]:
    with tempfile.TemporaryDirectory(prefix="vae-mlmodel-") as tmp:
        try:
            mlmodel_file = _download(root, "MLmodel", Path(tmp), tracking_uri)
            mlmodel = yaml.safe_load(mlmodel_file.read_text())
        except Exception as exc:  # no MLmodel at all, or not YAML
            raise UnsafeModelError(
                f"{model_uri} has no readable MLmodel file ({type(exc).__name__}: {str(exc)[:200]}); it was not "
                "loaded. Point the alias at a version logged by this pipeline, or register a new one."
            ) from None
    if not isinstance(mlmodel, dict):
        raise UnsafeModelError(f"{model_uri}: its MLmodel file is not a mapping; it was not loaded")
    return _artifact_paths(mlmodel, model_uri)


def vae_from_files(weights_path: Path, config_path: Path, source: str = "") -> VAE:
    """Rebuild the VAE from a state_dict file and a config JSON, with this package's code only."""
    import pickle

    import torch

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
    paths = _verify_root(root, model_uri, tracking_uri)
    with tempfile.TemporaryDirectory(prefix="vae-weights-") as tmp:
        weights = _download(root, paths[WEIGHTS], Path(tmp) / "w", tracking_uri)
        config = _download(root, paths[CONFIG], Path(tmp) / "c", tracking_uri)
        return vae_from_files(weights, config, source=model_uri)
