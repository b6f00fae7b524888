"""Typed, frozen parameters loaded from `params.yaml`, validated all at once.

`params.yaml` is the only source of tunable values: every field below is
required there, and an unknown, missing or ill-typed key is reported together
with every other problem in one `ParamsError`. The sections are frozen pydantic
dataclasses with extra keys forbidden: pydantic finds the problems, this module
words them (`train.epochs: must be > 0, got 0`).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, Mapping

import torch
import yaml
from pydantic import AfterValidator, ConfigDict, Field, Strict, TypeAdapter, ValidationError, ValidationInfo
from pydantic.dataclasses import dataclass
from pydantic_core import PydanticCustomError

from vae_mlops.binarize import MODES as BINARIZE_MODES
from vae_mlops.datasets import known_datasets
from vae_mlops.errors import VaeMlopsError
from vae_mlops.metric_catalogue import gate_metric_problem
from vae_mlops.plugins import names as plugin_names
from vae_mlops.precision import PRECISIONS

DATASETS = ("mnist", "fashion-mnist")
# The legal names from the plugin folders' file names: validating params imports no model code
LIKELIHOODS = plugin_names("vae_mlops.likelihoods")  # one module each in vae_mlops/likelihoods/
ARCHS = plugin_names("vae_mlops.archs")
PRIORS = plugin_names("vae_mlops.priors")
DEVICES = ("auto", "cpu", "cuda")
LATENT_MAPS = ("pca", "tsne")
PARTITIONS = ("kmeans", "umap")  # train.pretrain_partition: how vae_mlops.code_partition groups the codes
SNAPSHOT_ID = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{8}$")  # a snapshot of recorded traffic: <UTC time>-<sha256 prefix>


class ParamsError(VaeMlopsError, ValueError):
    """Raised with every problem found in the params, one per line."""

    def __init__(self, problems: list[str], source: str = "params.yaml") -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in {source}:\n{lines}\nFix them and rerun.")


# ---------------------------------------------------------------- field types

RULE = "params_rule"  # pydantic error type of the checks below; its message is used as written
LOADING = "params_loading"  # validation context of `parse_params`: checks against this machine run too


def _rule(check: Callable[[Any], str | None], on_load_only: bool = False) -> AfterValidator:
    """A check returning a problem (or None) as a pydantic validator.

    `on_load_only`: the check asks this machine (registered datasets, a GPU), so it runs
    when params are loaded, not when code or tests build a section object directly.
    """

    def validate(v: Any, info: ValidationInfo) -> Any:
        if on_load_only and info.context != LOADING:
            return v
        msg = check(v)
        if msg:
            raise PydanticCustomError(RULE, msg)
        return v

    return AfterValidator(validate)


def _one_of(*choices: str) -> Callable[[str], str | None]:
    def check(v: str) -> str | None:
        return None if v in choices else f"must be one of {', '.join(choices)}"

    return check


def _cuda_here(v: str) -> str | None:
    """`cuda` only where torch sees a GPU: reported with every other problem."""
    if v != "cuda":
        return None
    return None if torch.cuda.is_available() else "is 'cuda' but no CUDA GPU is available here; use auto or cpu"


def _extra_dataset_ok(v: str) -> str | None:
    # Datasets registered through VAE_EXTRA_DATASETS (e.g. tiny test data) are valid too.
    names = known_datasets()
    return None if v in names else f"must be one of {', '.join(sorted(names))}"


def _gate_metric(v: str) -> str | None:
    return gate_metric_problem(v)


def _not_empty(v: str) -> str | None:
    return None if v.strip() else "must not be empty"


def _snapshot_id(v: str) -> str | None:
    ok = SNAPSHOT_ID.match(v)
    return None if ok else "must be a snapshot id under data/incoming/ (like 20261206T041200Z-3fa2c1d0)"


def _cron(v: str) -> str | None:
    return None if len(v.split()) == 5 else "must be a 5-field cron expression"


# Strict: `true` is not an int and "3" is not a number; a float field takes an int and stores a float.
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
PositiveInt = Annotated[int, Strict(), Field(gt=0)]
NonNegativeInt = Annotated[int, Strict(), Field(ge=0)]
PositiveFloat = Annotated[float, Strict(), Field(gt=0)]
NonNegativeFloat = Annotated[float, Strict(), Field(ge=0)]
NonEmptyStr = Annotated[str, Strict(), _rule(_not_empty)]

SECTION = ConfigDict(extra="forbid")  # an unknown key is a problem, never silently ignored


@dataclass(frozen=True, config=SECTION)
class DataParams:
    dataset: Annotated[str, Strict(), _rule(_extra_dataset_ok, on_load_only=True)]
    timeout_s: PositiveFloat
    retries: PositiveInt
    # recorded traffic trained on besides the dataset (vae_mlops.snapshots): ids under data/incoming/
    snapshots: tuple[Annotated[str, Strict(), _rule(_snapshot_id)], ...]
    incoming_max_fraction: Annotated[float, Strict(), Field(ge=0, lt=1)]  # their largest share of the training set
    incoming_holdout: Annotated[float, Strict(), Field(gt=0, lt=1)]  # held out of each: half validation, half test
    binarize: Annotated[str, Strict(), _rule(_one_of(*BINARIZE_MODES))]  # none | dynamic (vae_mlops.binarize)


@dataclass(frozen=True, config=SECTION)
class ModelParams:
    hidden_dim: PositiveInt
    latent_dim: PositiveInt
    likelihood: Annotated[str, Strict(), _rule(_one_of(*LIKELIHOODS))]
    arch: Annotated[str, Strict(), _rule(_one_of(*ARCHS))]  # one module each in vae_mlops/archs/
    hidden_dims: tuple[PositiveInt, ...]  # mlp-deep's hidden sizes, input side first
    prior: Annotated[str, Strict(), _rule(_one_of(*PRIORS))]  # one module each in vae_mlops/priors/
    n_components: PositiveInt  # of the gmm prior


@dataclass(frozen=True, config=SECTION)
class TrainParams:
    device: Annotated[str, Strict(), _rule(_one_of(*DEVICES)), _rule(_cuda_here, on_load_only=True)]
    seed: NonNegativeInt
    epochs: PositiveInt
    batch_size: PositiveInt
    lr: PositiveFloat
    beta: NonNegativeFloat
    val_size: PositiveInt
    image_every: PositiveInt
    precision: Annotated[str, Strict(), _rule(_one_of(*PRECISIONS))]
    fused: Bool  # float32 step with a hand-written backward; bf16/compile use autograd
    compile: Bool
    cuda_graphs: Bool
    threads: NonNegativeInt  # 0: torch's default (OMP_NUM_THREADS under torchrun)
    distributed: Bool
    nproc: PositiveInt  # processes on this node; > 1: `python -m vae_mlops train` relaunches itself under torchrun
    pretrain_epochs: NonNegativeInt  # autoencoder epochs before training, then the prior is fitted to its codes
    pretrain_partition: Annotated[str, Strict(), _rule(_one_of(*PARTITIONS))]  # how the codes are grouped first
    pretrain_lr: PositiveFloat  # Adam's for the autoencoder epochs
    pretrain_batch_size: PositiveInt  # of the autoencoder epochs
    lr_decay: Annotated[float, Strict(), Field(gt=0, le=1)]  # lr times this every `lr_decay_epochs` epochs
    lr_decay_epochs: PositiveInt


@dataclass(frozen=True, config=SECTION)
class EvaluateParams:
    iwae_samples: PositiveInt
    batch_size: PositiveInt
    seed: NonNegativeInt
    n_clusters: Annotated[int, Strict(), Field(ge=2)]
    latent_map: Annotated[str, Strict(), _rule(_one_of(*LATENT_MAPS))]


@dataclass(frozen=True, config=SECTION)
class RegisterParams:
    model_name: NonEmptyStr
    metric: Annotated[str, Strict(), _rule(_gate_metric)]  # a catalogued metric with a direction
    min_delta: NonNegativeFloat


@dataclass(frozen=True, config=SECTION)
class MlflowParams:
    experiment: NonEmptyStr


@dataclass(frozen=True, config=SECTION)
class OrchestrateParams:
    cpu_pool: NonEmptyStr
    gpu_pool: Str
    retrain_cron: Annotated[str, Strict(), _rule(_cron)]
    timezone: NonEmptyStr
    task_timeout_s: PositiveFloat
    retries: NonNegativeInt  # of the network-facing tasks (download, register, dvc push/pull)
    retry_delay_s: PositiveFloat  # first backoff; doubles on each retry


@dataclass(frozen=True, config=SECTION)
class ServeParams:
    log_inputs: Bool  # record each answered image's 784 bytes, not only its scores
    flush_s: PositiveFloat  # the recorder's longest wait before a commit: what a SIGKILL may lose


@dataclass(frozen=True, config=SECTION)
class MonitorParams:
    window: Annotated[int, Strict(), Field(ge=10)]
    false_alarm_rate: Annotated[float, Strict(), Field(gt=0, lt=1)]  # per check
    calibration_rounds: Annotated[int, Strict(), Field(ge=100)]
    mmd_decides: Bool  # the latent MMD flags windows too; false: computed and logged, the ELBO's KS decides
    consecutive: PositiveInt  # windows in a row over a threshold = a drift
    cooldown_s: NonNegativeFloat
    cron: Annotated[str, Strict(), _rule(_cron)]
    experiment: NonEmptyStr
    seed: NonNegativeInt


@dataclass(frozen=True, config=SECTION)
class Params:
    data: DataParams
    model: ModelParams
    train: TrainParams
    evaluate: EvaluateParams
    register: RegisterParams
    mlflow: MlflowParams
    orchestrate: OrchestrateParams
    serve: ServeParams
    monitor: MonitorParams

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """`{"model.latent_dim": 20, ...}`: the form MLflow params and `dvc exp run -S` use."""
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}


# ---------------------------------------------------------------- validation

_PARAMS = TypeAdapter(Params)
_TYPE_NAMES = {"int_type": "int", "float_type": "float", "bool_type": "bool", "string_type": "str"}


def _known(loc: tuple) -> str:
    """The legal names at `loc`'s parent: the sections, or a section's keys."""
    cls = Params
    for part in loc[:-1]:
        cls = typing.get_type_hints(cls).get(part)
        if cls is None or not dataclasses.is_dataclass(cls):
            return ""
    return ", ".join(f.name for f in dataclasses.fields(cls))


def _problem(err: Mapping[str, Any]) -> str:
    """One pydantic error as the line a user reads: `dotted.key: what is wrong, got value`."""
    loc = tuple(err["loc"])
    key, kind, value = ".".join(map(str, loc)), err["type"], err.get("input")
    ctx = err.get("ctx") or {}
    top = len(loc) == 1
    if kind == "missing":
        return f"{key}: missing section" if top else f"{key}: missing"
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        return f"{key}: unknown {'section' if top else 'key'} (known: {_known(loc)})"
    if kind in ("dataclass_type", "dict_type", "model_type"):
        return f"{key}: must be a mapping, got {type(value).__name__}"
    if kind in _TYPE_NAMES:
        return f"{key}: expected {_TYPE_NAMES[kind]}, got {type(value).__name__} ({value!r})"
    if kind == "greater_than":
        return f"{key}: must be > {ctx['gt']}, got {value!r}"
    if kind == "greater_than_equal":
        return f"{key}: must be >= {ctx['ge']}, got {value!r}"
    return f"{key}: {err['msg']}, got {value!r}"


def _cross_checks(p: Params) -> list[str]:
    problems = []
    if p.train.val_size >= 60_000 and p.data.dataset in DATASETS:
        problems.append("train.val_size: must leave training images (< 60000)")
    if p.model.arch == "mlp-deep" and not p.model.hidden_dims:
        problems.append("model.hidden_dims: mlp-deep needs at least one hidden size, e.g. [500, 500, 2000]")
    if p.model.prior == "gmm" and p.model.n_components < 2:
        problems.append(f"model.n_components: the gmm prior needs at least 2 components, got {p.model.n_components}")
    if p.register.metric.startswith("latent.mixture_") and p.model.prior == "normal":
        problems.append(f"register.metric: {p.register.metric} exists only for a mixture prior (model.prior: gmm)")
    if p.train.cuda_graphs and p.train.lr_decay != 1.0:
        problems.append("train.lr_decay: a CUDA graph replays the learning rate it captured; "
                        "set train.cuda_graphs: false or train.lr_decay: 1.0")
    return problems


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    """Validate a raw mapping into `Params`, raising one `ParamsError` with every problem."""
    if not isinstance(raw, Mapping):
        raise ParamsError([f"top level must be a mapping, got {type(raw).__name__}"], source)
    try:
        params = _PARAMS.validate_python(dict(raw), context=LOADING)
    except ValidationError as exc:
        raise ParamsError([_problem(e) for e in exc.errors()], source) from None
    problems = _cross_checks(params)
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


def load_raw(path: Path, overrides: Mapping[str, Any] | None = None) -> Any:
    """`params.yaml` as written (no validation, no type coercion), with dotted-key overrides applied."""
    raw = read_raw(path)
    if overrides:
        raw = apply_overrides(raw if isinstance(raw, Mapping) else {}, overrides)
    return raw


def load_params(
    path: Path = Path("params.yaml"), overrides: Mapping[str, Any] | None = None, source: str | None = None
) -> Params:
    """Load and validate `params.yaml` with optional dotted-key overrides: every problem in one `ParamsError`.

    `source` names what was loaded in that error (default: the file, and the overrides if any).
    """
    if source is None:
        source = f"{path} with overrides {dict(overrides)}" if overrides else str(path)
    return parse_params(load_raw(path, overrides), source)


def parse_set_args(pairs: list[str]) -> dict[str, Any]:
    """`-S train.epochs=3` -> {"train.epochs": 3}, values parsed as YAML (as `dvc exp run -S` does)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ParamsError([f"-S {pair}: expected KEY=VALUE"], "the command line")
        out[key.strip()] = yaml.safe_load(value)
    return out
