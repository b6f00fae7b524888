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
