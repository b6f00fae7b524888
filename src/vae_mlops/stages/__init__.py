"""The pipeline's stages: each a function of (params, paths) -> files and metrics.

One definition of each stage, one module each; `cli.py` (what `dvc.yaml` runs)
and the Prefect flows in `pipeline/` are thin runners over these functions.
No argument parsing, tracking-URI setup or work at import time here: a runner
opens the MLflow run (`tracking.train_run`, `tracking.stage_run`) and passes it in.
Import a stage from its module (`from vae_mlops.stages.train import train`): this package
imports none of them, so a process that runs one stage loads only that stage's libraries.
"""
