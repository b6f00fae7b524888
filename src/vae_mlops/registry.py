"""Register a trained VAE and decide, through a gate, whether it becomes the champion.

The alias `champion` moves to a new version only if it beats the current champion
on `register.metric` by at least `register.min_delta`, on the same dataset and
the same test data (a champion scored on data with another hash is re-scored on
the current test split first). Otherwise the new version gets `challenger`. The
first version is champion. Values that are not of one kind are never compared:
a champion of another dataset, or, for a likelihood-dependent metric
(`metric_catalogue`), of another `model.likelihood` or another `data.binarize`,
stays, and the decision says what to change.

Aliases keep no history, so every decision is appended to the promotion log
(`reports/promotions.jsonl`) and tagged on its version (`promotion`, JSON).

Two registrations at once: against a local store (sqlite, file) the whole
decision runs under an exclusive file lock beside the store; against a tracking
server, after setting the alias the gate re-reads it and decides again if
another registration moved it meanwhile. An alias names one version, so there is
never more than one champion, and once there is a champion there is always one.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import logging
import os
import re
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from rich.table import Table

from vae_mlops import model_store, tracking
from vae_mlops.binarize import NONE as NONE_BINARIZED
from vae_mlops.errors import VaeMlopsError
from vae_mlops.locks import wait_flock
from vae_mlops.metric_catalogue import CATALOGUE, Metric, gate_metric_problem
from vae_mlops.params import RegisterParams

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
PROMOTED = "promoted"
NOT_PROMOTED = "not promoted"

TAG_MODEL_SHA256 = "model.sha256"
TAG_LIKELIHOOD = "model.likelihood"  # a likelihood-dependent metric compares only between versions of one
TAG_BINARIZE = "data.binarize"  # ... and of one binarisation (vae_mlops.binarize)
TAG_METRIC = "metric."  # + metric key: the value on the test data of `data.hash`
TAG_PROMOTION = "promotion"
TAG_ROLLBACK = "rollback."  # + UTC time as digits: one JSON decision per rollback to this version
ROLLED_BACK = "rolled back"
ROLLBACK_COMMAND = 'make rollback VERSION=<n> REASON="<why>"'
LOCK_TIMEOUT_S = 900.0  # a registration that re-scores a champion on full MNIST takes minutes
VERIFY_ROUNDS = 5  # servers: re-read the alias this often before trusting it
VERIFY_DELAY_S = 0.5


class RegistryError(VaeMlopsError):
    """The gate cannot decide (unknown metric, missing champion data, lock timeout): says why."""


@dataclass(frozen=True)
class Candidate:
    """What the register stage hands to the gate: the model, its scores and where they came from."""

    model: object  # the VAE
    metrics: dict[str, float]
    dataset: str
    data_hash: str  # of the data the metrics were computed on
    git_commit: str
    model_sha256: str
    input_example: object  # (2, 784) float32 numpy: test images
    binarize: str = NONE_BINARIZED  # its `data.binarize`: what its likelihood metrics were scored on

    @property
    def likelihood(self) -> str | None:
        """The model's `model.likelihood` (its config knows it)."""
        return getattr(getattr(self.model, "config", None), "likelihood", None)


@dataclass(frozen=True)
class Champion:
    """The current champion as the gate sees it: `value` on the candidate's test data, or None."""

    version: str
    dataset: str
    value: float | None
    rescored: bool = False
    likelihood: str | None = None  # its `model.likelihood`; None: not recorded
    binarize: str = NONE_BINARIZED  # its `data.binarize`; versions from before it was recorded trained on grey values


@dataclass(frozen=True)
class Decision:
    """One line of the promotion log."""

    time: str
    model_name: str
    version: str
    alias: str
    decision: str
    reason: str
    metric: str
    lower_is_better: bool
    value: float
    champion_version: str | None
    champion_value: float | None
    dataset: str
    data_hash: str
    git_commit: str
    run_id: str
    likelihood: str | None = None  # the version's; absent from decisions logged before it was recorded
    champion_likelihood: str | None = None

    @property
    def promoted(self) -> bool:
        return self.decision == PROMOTED

    def to_dict(self) -> dict:
        return asdict(self)


def gate_metric(metric: str) -> Metric:
    """The catalogue's entry for `register.metric`; only a metric with a better direction can drive the gate."""
    problem = gate_metric_problem(metric)
    if problem:
        raise RegistryError(f"register.metric={metric!r} cannot drive the gate: {problem}")
    return CATALOGUE[metric]


def comparable(metric: str, likelihood: str | None, champion: Champion, binarize: str = NONE_BINARIZED) -> bool:
    """False when `metric` depends on the likelihood and the two versions' likelihoods or binarisations differ."""
    m = CATALOGUE[metric]
    return not m.per_likelihood or (champion.likelihood == likelihood and champion.binarize == binarize)


def decide(
    metric: str,
    min_delta: float,
    value: float,
    dataset: str,
    champion: Champion | None,
    likelihood: str | None = None,
    binarize: str = NONE_BINARIZED,
) -> tuple[bool, str]:
    """The gate itself: (promote?, why). Promotes only on a strict improvement of at least `min_delta`.

    `likelihood` is the candidate's `model.likelihood`; a likelihood-dependent metric is
    compared only with a champion of the same one (None on both sides counts as the same), and of the
    same `binarize` (`data.binarize`): a log-likelihood of binary pixels and one of grey values are not
    numbers of one kind either.
    """
    lower = gate_metric(metric).lower_is_better
    if champion is None:
        return True, "first version: there is no champion yet"
    if champion.dataset != dataset:
        return False, (
            f"not compared: champion v{champion.version} was evaluated on {champion.dataset!r}, this version "
            f"on {dataset!r}; the champion stays (use one register.model_name per dataset)"
        )
    if not comparable(metric, likelihood, champion, binarize):
        return False, _not_compared(metric, likelihood, binarize, champion)
    assert champion.value is not None
    gain = champion.value - value if lower else value - champion.value
    way = "lower" if lower else "higher"
    how = " (champion re-scored on the current test data)" if champion.rescored else ""
    versus = f"{metric} {value:.4f} vs champion v{champion.version} {champion.value:.4f}{how}, {way} is better"
    if gain > 0 and gain >= min_delta:
        return True, f"{versus}: better by {gain:.4f} >= min_delta {min_delta}"
    if gain > 0:
        return False, f"{versus}: better by only {gain:.4f} < min_delta {min_delta}; the champion stays"
    return False, f"{versus}: {'no better' if gain == 0 else f'worse by {-gain:.4f}'}; the champion stays"



def _not_compared(metric: str, likelihood: str | None, binarize: str, champion: Champion) -> str:
    """Why `decide` leaves a likelihood-dependent metric uncompared with this champion, and what to do instead."""
    across = ", ".join(k for k, m in CATALOGUE.items() if m.direction and not m.per_likelihood)
    if champion.binarize != binarize:
        what = "a log-likelihood of the test pixels, comparable only between models of one data.binarize"
        theirs, ours, kinds = f"data.binarize={champion.binarize}", f"data.binarize={binarize}", "binarisations"
    else:
        what = "a density under each model's own likelihood, comparable only within one"
        theirs, ours, kinds = champion.likelihood or "of an unrecorded likelihood", likelihood, "likelihoods"
    return (
        f"not compared: {metric} is {what}; champion v{champion.version} is {theirs}, this version {ours}. "
        f"The champion stays: to gate across {kinds} set register.metric to one that compares across them "
        f"({across}), or register each under its own register.model_name"
    )

# ---------------------------------------------------------------- the lock


@contextlib.contextmanager
def registration_lock(uri: str, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[bool]:
    """An exclusive lock beside a local store (True), or nothing for a server (False: verify instead).

    `flock` is released by the kernel when its holder dies, so a killed registration never leaves it stuck.
    """
    store = tracking.local_store_path(uri)
    if store is None:
        yield False
        return
    path = lock_path(store)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        if not wait_flock(fh, timeout_s, poll_s=0.1):
            raise RegistryError(
                f"another registration has held {path} for over {timeout_s:.0f}s; wait for it to finish, then rerun"
            )
        try:
            fh.seek(0)
            fh.truncate()
            fh.write(f"{socket.gethostname()} pid {os.getpid()}\n")
            fh.flush()
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def lock_path(store: Path) -> Path:
    return store.with_name(store.name + ".register.lock")


# ---------------------------------------------------------------- register + gate


def register(
    run: tracking.PipelineRun,
    candidate: Candidate,
    cfg: RegisterParams,
    promotion_log: Path,
    rescore: Callable[[object], float],
) -> Decision:
    """Log the model into the pipeline's run, register a version and pass it through the gate.

    `rescore(vae) -> value of cfg.metric` scores a champion on the current test data
    when it was scored on data with another hash. Registering the same run's model
    again returns the recorded decision instead of a second version.
    """
    gate_metric(cfg.metric)
    if cfg.metric not in candidate.metrics:
        raise RegistryError(f"register.metric={cfg.metric!r} is not in the metrics ({', '.join(candidate.metrics)})")
    reg = tracking.ModelRegistry(cfg.model_name, run.uri)
    with registration_lock(run.uri) as locked:
        existing = reg.find(run.run_id, TAG_MODEL_SHA256, candidate.model_sha256)
        if existing is not None and TAG_PROMOTION in existing.tags:
            decision = Decision(**json.loads(existing.tags[TAG_PROMOTION]))
            log.info("this run's model is already version %s of %s: %s", decision.version, reg.name, decision.reason)
            return decision
        current = reg.aliases().get(CHAMPION)
        if current is not None and (existing is None or current != existing.version):
            check_champion(reg, current)  # before a version is made: a refused champion leaves nothing behind
        version = existing or _new_version(run, reg, candidate)
        decision = gate(reg, version.version, run.run_id, candidate, cfg, rescore)
        if not locked:
            decision = _settle(reg, decision, run.run_id, candidate, cfg, rescore)
        record(reg, decision, promotion_log)
        describe_version(reg, decision, candidate, run)
    return decision


def version_tags(c: Candidate) -> dict[str, str]:
    """Where a version came from and how it scored: git commit, dataset, data hash, model sha256, metrics."""
    return {
        tracking.TAG_GIT_COMMIT: c.git_commit,
        tracking.TAG_DATASET: c.dataset,
        tracking.TAG_DATA_HASH: c.data_hash,
        TAG_MODEL_SHA256: c.model_sha256,
        **({TAG_LIKELIHOOD: c.likelihood} if c.likelihood else {}),
        TAG_BINARIZE: c.binarize,
        **{TAG_METRIC + k: repr(float(v)) for k, v in c.metrics.items()},
    }


def _new_version(run: tracking.PipelineRun, reg: tracking.ModelRegistry, c: Candidate) -> tracking.VersionInfo:
    tags = version_tags(c)
    model_uri = model_store.log_vae(run, c.model, c.input_example, tags, c.metrics)
    return reg.create_version(model_uri, run.run_id, tags)


def gate(
    reg: tracking.ModelRegistry,
    version: str,
    run_id: str,
    candidate: Candidate,
    cfg: RegisterParams,
    rescore: Callable[[object], float],
) -> Decision:
    """Compare `version` with the champion and set `champion` or `challenger` on it."""
    value = float(candidate.metrics[cfg.metric])
    current = reg.aliases().get(CHAMPION)
    champion = None
    if current is not None and current != version:
        check_champion(reg, current)
        champion = _champion(reg, current, candidate, cfg.metric, rescore)
    if current == version:  # settled already (a server round that found its own alias)
        promote, reason = True, "already the champion"
    else:
        promote, reason = decide(
            cfg.metric, cfg.min_delta, value, candidate.dataset, champion, candidate.likelihood, candidate.binarize
        )
    alias = CHAMPION if promote else CHALLENGER
    reg.set_alias(alias, version)
    return Decision(
        time=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        model_name=reg.name,
        version=version,
        alias=alias,
        decision=PROMOTED if promote else NOT_PROMOTED,
        reason=reason,
        metric=cfg.metric,
        lower_is_better=bool(gate_metric(cfg.metric).lower_is_better),
        value=value,
        champion_version=champion.version if champion else None,
        champion_value=champion.value if champion else None,
        dataset=candidate.dataset,
        data_hash=candidate.data_hash,
        git_commit=candidate.git_commit,
        run_id=run_id,
        likelihood=candidate.likelihood,
        champion_likelihood=champion.likelihood if champion else None,
    )


def check_champion(reg: tracking.ModelRegistry, version: str) -> None:
    """Refuse a champion that is not in the weights-only format, whether or not it needs re-scoring.

    Only its MLmodel file is read (YAML); nothing of it is unpickled or run.
    """
    try:
        model_store.verify(f"models:/{reg.name}/{version}", reg.uri)
    except model_store.UnsafeModelError as exc:
        how = "" if "make rollback" in str(exc) else f" Move the champion back with `{ROLLBACK_COMMAND}`."
        raise model_store.UnsafeModelError(
            f"the gate refuses to compare with champion v{version} of {reg.name}: {exc}{how}"
        ) from None


def _champion(
    reg: tracking.ModelRegistry, version: str, candidate: Candidate, metric: str, rescore: Callable[[object], float]
) -> Champion:
    """The champion's score on the candidate's test data: its own tag when the data hash agrees, else re-scored."""
    info = reg.version(version)
    dataset = info.tags.get(tracking.TAG_DATASET, "unknown")
    kind = {"likelihood": champion_likelihood(reg, info), "binarize": champion_binarize(reg, info)}
    if dataset != candidate.dataset:
        return Champion(version, dataset, None, **kind)
    if not comparable(metric, candidate.likelihood, Champion(version, dataset, None, **kind), candidate.binarize):
        return Champion(version, dataset, None, **kind)  # not compared, so not re-scored either
    if info.tags.get(tracking.TAG_DATA_HASH) == candidate.data_hash and TAG_METRIC + metric in info.tags:
        return Champion(version, dataset, float(info.tags[TAG_METRIC + metric]), **kind)
    cached = f"{TAG_METRIC}{metric}:{candidate.data_hash[:16]}"  # a re-score done before on this data
    if cached in info.tags:
        return Champion(version, dataset, float(info.tags[cached]), rescored=True, **kind)
    log.info("champion v%s was scored on other test data: re-scoring it on the current test split", version)
    started = time.monotonic()
    value = float(rescore(model_store.load_vae(f"models:/{reg.name}/{version}", reg.uri)))
    log.info("champion v%s re-scored: %s = %.4f (%.0f s)", version, metric, value, time.monotonic() - started)
    reg.set_tags(version, {cached: repr(value)})
    return Champion(version, dataset, value, rescored=True, **kind)


def champion_likelihood(reg: tracking.ModelRegistry, info: tracking.VersionInfo) -> str | None:
    """The version's `model.likelihood` tag, else its run's logged param (versions registered before the tag)."""
    if TAG_LIKELIHOOD in info.tags:
        return info.tags[TAG_LIKELIHOOD]
    run = tracking.RunReader(reg.uri).run(info.run_id) if info.run_id else None
    return run.params.get("model.likelihood") if run else None


def champion_binarize(reg: tracking.ModelRegistry, info: tracking.VersionInfo) -> str:
    """The version's `data.binarize` tag, else its run's logged param, else `none` (made before binarisation)."""
    if TAG_BINARIZE in info.tags:
        return info.tags[TAG_BINARIZE]
    run = tracking.RunReader(reg.uri).run(info.run_id) if info.run_id else None
    return (run.params.get(TAG_BINARIZE) if run else None) or NONE_BINARIZED


def _settle(
    reg: tracking.ModelRegistry,
    decision: Decision,
    run_id: str,
    candidate: Candidate,
    cfg: RegisterParams,
    rescore: Callable[[object], float],
) -> Decision:
    """Servers have no lock: re-read `champion` and decide again while another registration moved it."""
    for _ in range(VERIFY_ROUNDS):
        time.sleep(VERIFY_DELAY_S)
        current = reg.aliases().get(CHAMPION)
        if current is None or (decision.promoted and current != decision.version):
            decision = gate(reg, decision.version, run_id, candidate, cfg, rescore)
            continue
        return decision
    raise RegistryError(
        f"the champion alias of {reg.name} kept moving under version {decision.version} "
        f"({VERIFY_ROUNDS} rounds); check who else registers, then rerun"
    )


def record(reg: tracking.ModelRegistry, decision: Decision, promotion_log: Path) -> None:
    """Append the decision to the promotion log and tag it on its version."""
    entry = json.dumps(decision.to_dict(), sort_keys=True)
    reg.set_tags(
        decision.version,
        {TAG_PROMOTION: entry, "promotion.decision": decision.decision, "promotion.reason": decision.reason},
    )
    append_decision(promotion_log, entry, decision.version)
    log.info("%s v%s -> %s: %s", reg.name, decision.version, decision.alias, decision.reason)


def append_decision(promotion_log: Path, entry: str, version: str) -> None:
    """Append one decision (a JSON line) to the promotion log, whole or not at all."""
    promotion_log.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(promotion_log, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        # A line torn by an earlier full disk has no newline: start ours on a fresh line so it stays whole.
        size = os.fstat(fd).st_size
        torn = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
        line = (b"\n" if torn else b"") + (entry + "\n").encode()
        try:
            # One write(2) on O_APPEND: concurrent appenders never interleave inside a line.
            written = os.write(fd, line)
            if written != len(line):  # a full disk mid-line: take the partial line back
                os.ftruncate(fd, os.lseek(fd, 0, os.SEEK_CUR) - written)
                raise OSError(28, "No space left on device")
            os.fsync(fd)
        except OSError as exc:
            raise RegistryError(
                f"could not append to {promotion_log}: {exc.strerror or exc}. Free disk space and rerun; "
                f"the decision is tagged on version {version} (`make history` shows it)"
            ) from exc
    finally:
        os.close(fd)


# ---------------------------------------------------------------- history


def read_log(promotion_log: Path) -> list[dict]:
    """Every whole line of the promotion log; a torn line (a write cut by a full disk) is reported and skipped."""
    if not promotion_log.is_file():
        return []
    rows = []
    for number, line in enumerate(promotion_log.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            log.warning("%s line %d is torn or not a decision (skipped): %.80s", promotion_log, number, line)
            continue
        rows.append(row)
    return rows


def registry_history(reg: tracking.ModelRegistry) -> list[dict]:
    """Every decision tagged in the registry (all machines), oldest first."""
    rows = [
        json.loads(value)
        for v in reg.versions()
        for key, value in v.tags.items()
        if key == TAG_PROMOTION or key.startswith(TAG_ROLLBACK)
    ]
    return sorted(rows, key=lambda r: r["time"])


def history_table(rows: list[dict], title: str):
    """A rich Table: who was champion when, and why."""

    table = Table(title=title)
    for col in ("time (UTC)", "version", "decision", "alias", "metric", "value", "champion", "reason", "commit"):
        table.add_column(col, overflow="fold")
    for r in rows:
        champ = "-" if r.get("champion_version") is None else f"v{r['champion_version']}"
        if r.get("champion_value") is not None:
            champ += f" {r['champion_value']:.4f}"
        table.add_row(
            r["time"][:19].replace("T", " "), f"v{r['version']}", r["decision"], r["alias"], r["metric"],
            f"{r['value']:.4f}", champ, r["reason"], r["git_commit"][:8],
        )  # fmt: skip
    return table


# ---------------------------------------------------------------- rollback


def rollback(reg: tracking.ModelRegistry, version: str, reason: str, metric: str, promotion_log: Path) -> Decision:
    """Move `champion` back to `version`, a version this pipeline logged, and keep the record.

    The version passes the gate's own checks first (registered through the gate, weights-only
    format, read from its MLmodel file only); the decision is appended to the promotion log and
    tagged on the version (`rollback.<time>`), so `make history` shows who was champion when.
    The scoring server follows the alias, so it serves the version within one poll.
    """
    if not reason.strip():
        raise RegistryError(f'a rollback needs a reason for the record: {ROLLBACK_COMMAND}')
    with registration_lock(reg.uri):
        known = {v.version: v for v in reg.versions()}
        if version not in known:
            listed = ", ".join(f"v{v}" for v in known) or "none"
            raise RegistryError(
                f"{reg.name} has no version {version!r} (versions: {listed}); `make history` lists them"
            )
        info = known[version]
        if TAG_MODEL_SHA256 not in info.tags or TAG_PROMOTION not in info.tags:
            raise RegistryError(
                f"{reg.name} v{version} was not registered by this pipeline's gate (no {TAG_MODEL_SHA256!r} or "
                f"{TAG_PROMOTION!r} tag); roll back only to a version `dvc repro` registered"
            )
        try:
            model_store.verify(f"models:/{reg.name}/{version}", reg.uri)
        except model_store.UnsafeModelError as exc:
            raise model_store.UnsafeModelError(f"refusing to roll back to v{version}: {exc}") from None
        current = reg.aliases().get(CHAMPION)
        if current == version:
            raise RegistryError(f"{reg.name} v{version} is the champion already; nothing to roll back")
        before = known.get(current) if current else None
        decision = _rollback_decision(reg.name, info, before, reason.strip(), metric)
        reg.set_alias(CHAMPION, version)
        entry = json.dumps(decision.to_dict(), sort_keys=True)
        reg.set_tags(version, {TAG_ROLLBACK + re.sub(r"\D", "", decision.time[:23]): entry})  # digits only
        append_decision(promotion_log, entry, version)
        _note_rollback(reg, decision)
    log.info("%s v%s -> %s: %s", reg.name, version, CHAMPION, decision.reason)
    return decision


def _metric_tag(info: tracking.VersionInfo | None, metric: str) -> float | None:
    raw = info.tags.get(TAG_METRIC + metric) if info else None
    return float(raw) if raw is not None else None


def _rollback_decision(
    name: str, info: tracking.VersionInfo, before: tracking.VersionInfo | None, reason: str, metric: str
) -> Decision:
    value = _metric_tag(info, metric)
    return Decision(
        time=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        model_name=name,
        version=info.version,
        alias=CHAMPION,
        decision=ROLLED_BACK,
        reason=f"rollback from v{before.version if before else '-'} by {_who()}: {reason}",
        metric=metric,
        lower_is_better=bool(gate_metric(metric).lower_is_better),
        value=float("nan") if value is None else value,
        champion_version=before.version if before else None,
        champion_value=_metric_tag(before, metric),
        dataset=info.tags.get(tracking.TAG_DATASET, "unknown"),
        data_hash=info.tags.get(tracking.TAG_DATA_HASH, ""),
        git_commit=info.tags.get(tracking.TAG_GIT_COMMIT, ""),
        run_id=info.run_id,
        likelihood=info.tags.get(TAG_LIKELIHOOD),
        champion_likelihood=before.tags.get(TAG_LIKELIHOOD) if before else None,
    )


def _who() -> str:
    """The person behind a rollback, for the record: git's user.name, else the login name."""
    try:
        name = subprocess.run(["git", "config", "user.name"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        name = ""
    return name.strip() or os.environ.get("GIT_AUTHOR_NAME") or getpass.getuser()


# ---------------------------------------------------------------- model cards

SAFE_LOAD = (
    "MLFLOW_TRACKING_URI=<store> python -c 'from vae_mlops.model_store import load_pyfunc; "
    'model = load_pyfunc("models:/{name}@champion"); print(model.metadata.run_id)\''
)


def model_description(name: str) -> str:
    """The registered model's card: what it is, what its aliases mean, and how to load it without unpickling."""
    return f"""\
**{name}**: a variational autoencoder (Kingma & Welling 2014) on 28x28 grey images, trained, evaluated and
registered by the vae-mlops pipeline (`dvc repro`: download, train, evaluate, register).

- **Input:** `(N, 784)` float32 pixel values on [0, 1]. **Output** (inference param `output`): `reconstruction`
  (default), `mu`, `log_std`, or `elbo` (one novelty score per image, in nats).
- **Aliases:** `champion` moves only through the promotion gate (`register.metric`, `register.min_delta`) or a
  recorded rollback (`{ROLLBACK_COMMAND}`); `challenger` is the latest version that did not pass.
  `make history` lists every decision.
- **Format:** the VAE's `state_dict` and its config as JSON beside a models-from-code pyfunc; nothing in a
  version is a pickle. **Load it safely** (weights only, `torch.load(weights_only=True)`, this package's code):

```bash
{SAFE_LOAD.format(name=name)}
```

  `load_pyfunc` checks the version's MLmodel against this format first and loads the weights with the installed
  package's code; then `model.predict(x, params={{"output": "mu"}})["values"]`. Serve it with `make serve-model`.
- Each version's card holds its test metrics and what they mean, its data, params, commit, the gate's decision
  and links to its run and comparison report.
"""


def version_description(
    decision: Decision, metrics: dict[str, float], params: dict[str, str], experiment_id: str
) -> str:
    """One version's card: the gate's decision, test metrics with their meaning, data, params, commit, links."""
    run = f"#/experiments/{experiment_id}/runs/{decision.run_id}"
    rows = "\n".join(
        f"| `{k}` | {v:.4f} | {CATALOGUE[k].direction or '-'} | {CATALOGUE[k].meaning} |"
        for k, v in metrics.items()
        if k in CATALOGUE
    )
    shown = sorted(k for k in params if k.split(".")[0] in ("model", "train", "data", "evaluate", "register"))
    param_rows = "\n".join(f"| `{k}` | `{params[k]}` |" for k in shown)
    return f"""\
**v{decision.version} of {decision.model_name}: {decision.decision}, alias `{decision.alias}`.**
Gate: {decision.reason}

- **Data:** `{decision.dataset}`, data hash `{decision.data_hash}` (sha256 over its files' sha256, as in
  `data/raw/{decision.dataset}/manifest.json`)
- **Commit:** `{decision.git_commit}`
- **Run:** [{decision.run_id}]({run}); **comparison report** with its champion:
  [`compare/compare.html`]({run}/artifactPath/compare/compare.html) in the run's artifacts

| metric (test split) | value | better | meaning |
| --- | --- | --- | --- |
{rows}

| param | value |
| --- | --- |
{param_rows or '| (not recorded) | |'}
"""


def describe_version(
    reg: tracking.ModelRegistry, decision: Decision, candidate: Candidate, run: tracking.PipelineRun
) -> None:
    """Write the version's card and the registered model's card (the MLflow UI's descriptions)."""
    summary = tracking.RunReader(reg.uri).run(run.run_id)
    params = summary.params if summary else {}
    text = version_description(decision, candidate.metrics, params, run.experiment_id)
    reg.client.update_model_version(reg.name, decision.version, description=text)
    reg.client.update_registered_model(reg.name, description=model_description(reg.name))


def _note_rollback(reg: tracking.ModelRegistry, decision: Decision) -> None:
    """Add the rollback to the top of the version's card, keeping the rest."""
    card = reg.client.get_model_version(reg.name, decision.version).description or ""
    when = decision.time[:19].replace("T", " ")
    note = f"**Champion again by rollback** ({when} UTC): {decision.reason}\n\n"
    reg.client.update_model_version(reg.name, decision.version, description=note + card)
