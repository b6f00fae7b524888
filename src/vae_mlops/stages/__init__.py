"""The pipeline's stages: each a function of (params, paths) -> files and metrics.

One definition of each stage, one module each; `cli.py` (what `dvc.yaml` runs)
and the Prefect flows in `pipeline/` are thin runners over these functions.
No argument parsing, tracking-URI setup or work at import time here: a runner
opens the MLflow run (`tracking.train_run`, `tracking.stage_run`) and passes it in.
"""

from vae_mlops.stages.download import download
from vae_mlops.stages.evaluate import evaluate
from vae_mlops.stages.register import register
from vae_mlops.stages.train import train

__all__ = ["download", "train", "evaluate", "register"]
