"""Every artifact path, defined once; `dvc.yaml` must agree (tests/test_paths.py checks)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    """Artifact locations below a project root (the folder holding `dvc.yaml`)."""

    root: Path = Path(".")

    @property
    def params_file(self) -> Path:
        return self.root / "params.yaml"

    # download
    def raw_dir(self, dataset: str) -> Path:
        return self.root / "data" / "raw" / dataset

    def data_manifest(self, dataset: str) -> Path:
        return self.raw_dir(dataset) / "manifest.json"

    # collect: snapshots of recorded traffic, one folder each, DVC-tracked (vae_mlops.snapshots)
    @property
    def incoming_dir(self) -> Path:
        return self.root / "data" / "incoming"

    # train
    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def model_file(self) -> Path:
        return self.models_dir / "vae.pt"

    @property
    def checkpoints_dir(self) -> Path:
        return self.models_dir / "checkpoints"

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    @property
    def history_file(self) -> Path:
        return self.reports_dir / "train_history.csv"

    @property
    def train_images_dir(self) -> Path:
        return self.reports_dir / "train"

    @property
    def train_run_file(self) -> Path:
        """The MLflow run the train stage opened; later stages log into the same run."""
        return self.reports_dir / "mlflow_run.json"

    # evaluate
    @property
    def metrics_file(self) -> Path:
        return self.reports_dir / "metrics.json"

    @property
    def eval_images_dir(self) -> Path:
        return self.reports_dir / "evaluate"

    # register
    @property
    def registration_file(self) -> Path:
        return self.reports_dir / "registration.json"

    @property
    def promotion_log(self) -> Path:
        return self.reports_dir / "promotions.jsonl"

    @property
    def compare_html(self) -> Path:
        """The candidate against the champion it was gated against (vae_mlops.compare)."""
        return self.reports_dir / "compare.html"

    @property
    def compare_md(self) -> Path:
        return self.reports_dir / "compare.md"

    # tracking: the embedded MLflow store (MLFLOW_TRACKING_URI points elsewhere)
    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlflow_artifacts_dir(self) -> Path:
        return self.root / "mlartifacts"

    # serving: local pyfunc folders rebuilt from verified weights (vae_mlops.serving)
    @property
    def serving_dir(self) -> Path:
        return self.root / ".serving"

    # benchmark
    @property
    def bench_file(self) -> Path:
        return self.reports_dir / "bench.json"
