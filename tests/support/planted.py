"""A planted model: an old-style pickled `mlflow.pytorch` model whose unpickling writes a marker file."""

from __future__ import annotations

import pathlib
from pathlib import Path

from torch import nn

from vae_mlops import tracking


class Planted(nn.Module):
    """Stands for any code an attacker with write access to the registry plants: unpickling it runs `touch`."""

    def __init__(self, marker: Path) -> None:
        super().__init__()
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def plant_pickle(run: tracking.PipelineRun, marker: Path) -> str:
    """Log a `Planted` as an `mlflow.pytorch` pickle model into `run`; returns its model URI."""
    import mlflow
    import mlflow.pytorch

    with tracking.use_store(run.uri), mlflow.start_run(run_id=run.run_id):
        info = mlflow.pytorch.log_model(
            Planted(marker), name="vae", serialization_format="pickle", pip_requirements=["torch"]
        )  # given requirements: MLflow would otherwise load the model in a subprocess to infer them
    assert not marker.exists()
    return info.model_uri


PLANTS = ("code-on-path", "own-loader", "models-from-code", "extra-code-folder")
MARKER_CODE = "import pathlib\npathlib.Path({marker!r}).touch()\n"


def plant_code(model_uri: str, tracking_uri: str, marker: Path, how: str) -> None:
    """Tamper with a genuine version in a file store, as anyone who can write its artifacts could.

    Each plant writes `marker` when MLflow's own loader follows the MLmodel:
    - code-on-path: `code: code` with `code/vae_mlops/pyfunc.py` (put first on sys.path);
    - own-loader: `loader_module: planted_loader` shipped in `code/`;
    - models-from-code: a `model_code_path` file that MLflow executes;
    - extra-code-folder: the MLmodel untouched, a `code/` folder beside it.
    """
    import yaml

    from vae_mlops import model_store

    root = Path(model_store._artifact_root(model_uri, tracking_uri).removeprefix("file://"))
    payload = MARKER_CODE.format(marker=str(marker))
    mlmodel_file = root / "MLmodel"
    mlmodel = yaml.safe_load(mlmodel_file.read_text())
    pyfunc = mlmodel["flavors"]["python_function"]
    code = root / "code"
    if how == "code-on-path":
        (code / "vae_mlops").mkdir(parents=True)
        (code / "vae_mlops" / "__init__.py").write_text("")
        (code / "vae_mlops" / "pyfunc.py").write_text(payload + "def _load_pyfunc(path):\n    return None\n")
        pyfunc["code"] = "code"
    elif how == "own-loader":
        code.mkdir()
        (code / "planted_loader.py").write_text(payload + "def _load_pyfunc(path):\n    return None\n")
        pyfunc["code"], pyfunc["loader_module"] = "code", "planted_loader"
    elif how == "models-from-code":
        (root / "served_model.py").write_text(payload)
        pyfunc.pop("data")
        pyfunc["loader_module"], pyfunc["model_code_path"] = "mlflow.pyfunc.model", "served_model.py"
    elif how == "extra-code-folder":
        (code / "vae_mlops").mkdir(parents=True)
        (code / "vae_mlops" / "pyfunc.py").write_text(payload)
    else:
        raise ValueError(how)
    mlmodel_file.write_text(yaml.safe_dump(mlmodel))
    assert not marker.exists()
