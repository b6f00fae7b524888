"""Typed, frozen parameters loaded from `params.yaml`, validated all at once.

`params.yaml` is the only source of tunable values: every field below is
required there, and an unknown, missing or ill-typed key is reported together
with every other problem in one `ParamsError`.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

DATASETS = ("mnist", "fashion-mnist")
LIKELIHOODS = ("bernoulli", "gaussian")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("float32", "bf16")
LATENT_MAPS = ("pca", "tsne")


class ParamsError(ValueError):
    """Raised with every problem found in the params, one per line."""

    def __init__(self, problems: list[str], source: str = "params.yaml") -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in {source}:\n{lines}\nFix them and rerun.")


def _positive(v: float) -> str | None:
    return None if v > 0 else "must be > 0"


def _non_negative(v: float) -> str | None:
    return None if v >= 0 else "must be >= 0"


def _device(v: str) -> str | None:
    """A known device name, and `cuda` only where torch sees a GPU: reported with every other problem."""
    known = _one_of(*DEVICES)(v)
    if known or v != "cuda":
        return known
    import torch  # only for this check: parsing params stays cheap for every other value

    return None if torch.cuda.is_available() else "is 'cuda' but no CUDA GPU is available here; use auto or cpu"


def _one_of(*choices: str):
    def check(v: str) -> str | None:
        return None if v in choices else f"must be one of {', '.join(choices)}"

    return check


def _extra_dataset_ok(v: str) -> str | None:
    # Datasets registered through VAE_EXTRA_DATASETS (e.g. tiny test data) are valid too.
    from vae_mlops.datasets import known_datasets

    names = known_datasets()
    return None if v in names else f"must be one of {', '.join(sorted(names))}"


def _check(fn) -> Any:
    return field(metadata={"check": fn})


@dataclass(frozen=True)
class DataParams:
    dataset: str = _check(_extra_dataset_ok)
    timeout_s: float = _check(_positive)
    retries: int = _check(_positive)


@dataclass(frozen=True)
class ModelParams:
    hidden_dim: int = _check(_positive)
    latent_dim: int = _check(_positive)
    likelihood: str = _check(_one_of(*LIKELIHOODS))


@dataclass(frozen=True)
class TrainParams:
    device: str = _check(_device)
    seed: int = _check(_non_negative)
    epochs: int = _check(_positive)
    batch_size: int = _check(_positive)
    lr: float = _check(_positive)
    beta: float = _check(_non_negative)
    val_size: int = _check(_positive)
    image_every: int = _check(_positive)
    precision: str = _check(_one_of(*PRECISIONS))
    fused: bool = _check(lambda v: None)  # float32 step with a hand-written backward; bf16/compile use autograd
    compile: bool = _check(lambda v: None)
    cuda_graphs: bool = _check(lambda v: None)
    threads: int = _check(_non_negative)  # 0: torch's default (OMP_NUM_THREADS under torchrun)
    distributed: bool = _check(lambda v: None)


@dataclass(frozen=True)
class EvaluateParams:
    iwae_samples: int = _check(_positive)
    batch_size: int = _check(_positive)
    seed: int = _check(_non_negative)
    n_clusters: int = _check(lambda v: None if v >= 2 else "must be >= 2")
    latent_map: str = _check(_one_of(*LATENT_MAPS))


@dataclass(frozen=True)
class RegisterParams:
    model_name: str = _check(lambda v: None if v.strip() else "must not be empty")
    metric: str = _check(lambda v: None if v.strip() else "must not be empty")
    min_delta: float = _check(_non_negative)


@dataclass(frozen=True)
class MlflowParams:
    experiment: str = _check(lambda v: None if v.strip() else "must not be empty")


@dataclass(frozen=True)
class OrchestrateParams:
    cpu_pool: str = _check(lambda v: None if v.strip() else "must not be empty")
    gpu_pool: str = _check(lambda v: None)
    retrain_cron: str = _check(lambda v: None if len(v.split()) == 5 else "must be a 5-field cron expression")
    timezone: str = _check(lambda v: None if v.strip() else "must not be empty")
    task_timeout_s: float = _check(_positive)
    retries: int = _check(_non_negative)  # of the network-facing tasks (download, register, dvc push/pull)
    retry_delay_s: float = _check(_positive)  # first backoff; doubles on each retry


@dataclass(frozen=True)
class Params:
    data: DataParams
    model: ModelParams
    train: TrainParams
    evaluate: EvaluateParams
    register: RegisterParams
    mlflow: MlflowParams
    orchestrate: OrchestrateParams

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """`{"model.latent_dim": 20, ...}`: the form MLflow params and `dvc exp run -S` use."""
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}


def _type_ok(value: Any, tp: type) -> bool:
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp)


def _section_types(cls: type) -> dict[str, type]:
    return typing.get_type_hints(cls)


def _parse_section(name: str, cls: type, raw: Any, problems: list[str]) -> Any:
    if not isinstance(raw, Mapping):
        problems.append(f"{name}: must be a mapping, got {type(raw).__name__}")
        return None
    types_ = _section_types(cls)
    for key in raw:
        if key not in types_:
            problems.append(f"{name}.{key}: unknown key (known: {', '.join(types_)})")
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        key = f"{name}.{f.name}"
        if f.name not in raw:
            problems.append(f"{key}: missing")
            continue
        v, tp = raw[f.name], types_[f.name]
        if not _type_ok(v, tp):
            problems.append(f"{key}: expected {tp.__name__}, got {type(v).__name__} ({v!r})")
            continue
        v = float(v) if tp is float else v
        msg = f.metadata["check"](v)
        if msg:
            problems.append(f"{key}: {msg}, got {v!r}")
        values[f.name] = v
    return cls(**values) if len(values) == len(dataclasses.fields(cls)) else None


def _cross_checks(p: Params, problems: list[str]) -> None:
    if p.train.val_size >= 60_000 and p.data.dataset in DATASETS:
        problems.append("train.val_size: must leave training images (< 60000)")


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    """Validate a raw mapping into `Params`, raising one `ParamsError` with every problem."""
    problems: list[str] = []
    if not isinstance(raw, Mapping):
        raise ParamsError([f"top level must be a mapping, got {type(raw).__name__}"], source)
    hints = typing.get_type_hints(Params)
    for key in raw:
        if key not in hints:
            problems.append(f"{key}: unknown section (known: {', '.join(hints)})")
    sections = {}
    for name, cls in hints.items():
        if name not in raw:
            problems.append(f"{name}: missing section")
            continue
        sections[name] = _parse_section(name, cls, raw[name], problems)
    if not problems:
        params = Params(**sections)
        _cross_checks(params, problems)
    if problems:
        raise ParamsError(problems, source)
    return params


def apply_overrides(raw: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of `raw` with dotted-key overrides (`{"train.epochs": 3}`) applied.

    Unknown keys are not added silently: `parse_params` reports them.
    """
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        if not key:
            out[dotted] = value  # reported as an unknown section
            continue
        out.setdefault(section, {})
        if isinstance(out[section], dict):
            out[section][key] = value
    return out


def read_raw(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError([f"{path} not found: run from the project root"], str(path)) from None
    except yaml.YAMLError as exc:
        raise ParamsError([f"not valid YAML: {exc}"], str(path)) from None
    return raw


def load_params(path: Path = Path("params.yaml"), overrides: Mapping[str, Any] | None = None) -> Params:
    """Load and validate `params.yaml`, with optional dotted-key overrides."""
    raw = read_raw(path)
    if overrides:
        raw = apply_overrides(raw if isinstance(raw, Mapping) else {}, overrides)
    return parse_params(raw, str(path))


def parse_set_args(pairs: list[str]) -> dict[str, Any]:
    """`-S train.epochs=3` -> {"train.epochs": 3}, values parsed as YAML (as `dvc exp run -S` does)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ParamsError([f"-S {pair}: expected KEY=VALUE"], "the command line")
        out[key.strip()] = yaml.safe_load(value)
    return out
