"""`vae-monitor`: the served version's recorded traffic against its reference; a drift emits `vae.drift.detected`.

Each run reads the inference table's rows since its last check
(`vae_mlops.inference_log`, the scores only), cuts each served version's rows into
windows of exactly `monitor.window` images (a shorter tail waits for the next run)
and checks every window against that version's reference (`vae_mlops.drift`: KS of
the ELBO, MMD of the latent means, thresholds calibrated to
`monitor.false_alarm_rate` per check). Every check is a step of the version's run in
the MLflow experiment `monitor.experiment`; each run ends with a Prefect markdown
artifact (`vae-monitor`) holding the picture: reference vs last window, and the
timeline so far.

`monitor.consecutive` windows in a row over a threshold make a drift: the flow emits
the Prefect event `vae.drift.detected` for that version, once; not again for the same
version within `monitor.cooldown_s`. `pipeline/deploy.py` declares the automation that
turns the event into one run of the retraining deployment (itself with the same
cooldown), and the `vae-monitor` deployment on `monitor.cron`.

The state (last row read, each version's step, run of windows over a threshold and
last event) is a small JSON file, `.inference/monitor_state.json` unless
`VAE_MONITOR_STATE` names another, replaced whole on every change.

    python -m pipeline.monitor [--root PATH]     # `make monitor`: one check now
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from matplotlib.figure import Figure
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event

from pipeline.flows import check_pinned_commit, checkout, in_checkout, resolve_root
from vae_mlops import atomic, cli_args, drift, inference_log, tracking
from vae_mlops.errors import VaeMlopsError
from vae_mlops.params import Params, load_params
from vae_mlops.paths import Paths
from vae_mlops.tracking.monitor_runs import MonitorTracker

MONITOR_FLOW = "vae-monitor"
DRIFT_EVENT = "vae.drift.detected"
ARTIFACT_KEY = "vae-monitor"
ENV_STATE = "VAE_MONITOR_STATE"
STATE_FILE = "monitor_state.json"
RESOURCE_PREFIX = "vae.model."  # an event's resource id: vae.model.<name> (the version is a label)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- state


@dataclass
class VersionState:
    """One served version's progress: its checks so far, its run of windows over a threshold, its last drift event."""

    step: int = 0
    run_length: int = 0
    consumed_through: int = 0  # the last row id of its last checked window
    last_event_at: float | None = None
    events: int = 0


@dataclass
class MonitorState:
    after_id: int = 0  # every row up to here is checked or dropped
    versions: dict[str, VersionState] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> MonitorState:
        if not path.is_file():
            return cls()
        try:
            raw = json.loads(path.read_text())
            return cls(int(raw["after_id"]), {k: VersionState(**v) for k, v in raw["versions"].items()})
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise VaeMlopsError(
                f"{path}: not a monitor state ({type(exc).__name__}: {exc}); move it away to start over from the first row"
            ) from None

    def save(self, path: Path) -> None:
        atomic.write_json(path, {"after_id": self.after_id, "versions": {k: asdict(v) for k, v in self.versions.items()}})


def state_path(root: Path) -> Path:
    return Path(os.environ.get(ENV_STATE) or root / inference_log.DEFAULT_DIR / STATE_FILE)


def version_key(model_name: str, version: str) -> str:
    return f"{model_name}/{version}"


# ---------------------------------------------------------------- one pass


@dataclass(frozen=True)
class CheckRecord:
    """One window's check: which version, which rows, the statistics, and whether it made (and reported) a drift."""

    model_name: str
    version: str
    step: int
    first_id: int
    last_id: int
    result: drift.CheckResult
    drift: bool  # `monitor.consecutive` windows in a row over a threshold
    event: bool  # ... and it was reported (not within the cooldown of the last report)
    window_elbo: np.ndarray = field(repr=False, compare=False)


@dataclass
class MonitorReport:
    checks: list[CheckRecord] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows
    references: dict[str, drift.Reference] = field(default_factory=dict)  # version key -> reference
    calibrations: dict[str, drift.Calibration] = field(default_factory=dict)
    run_ids: dict[str, str] = field(default_factory=dict)  # version key -> its MLflow monitor run
    rows_read: int = 0

    def skip(self, reason: str, n: int) -> None:
        if n:
            self.skipped[reason] = self.skipped.get(reason, 0) + n


OnDrift = Callable[[CheckRecord], None]


def monitor_once(
    params: Params,
    root: Path,
    on_drift: OnDrift,
    db_url: str | None = None,
    state_file: Path | None = None,
    tracker: MonitorTracker | None = None,
    now: Callable[[], float] = time.time,
) -> MonitorReport:
    """Check every full window recorded since the last pass; call `on_drift` for each drift to report.

    Plain Python (no Prefect): the flow passes an `on_drift` that emits the Prefect event.
    """
    cfg = params.monitor
    url = db_url or inference_log.reader_url(root)
    state_file = state_file or state_path(root)
    state = MonitorState.load(state_file)
    report = MonitorReport()
    if not inference_log.table_exists(url):
        log.info("nothing recorded yet at %s", inference_log.safe_url(url))
        return report
    rows = inference_log.read_since(url, state.after_id, with_images=False)
    report.rows_read = len(rows)
    if rows.empty:
        return report
    rule = drift.DriftRule(cfg.consecutive)
    pending: list[int] = []  # the first row of each version's tail that waits for a full window
    unversioned = rows["model_name"].isna() | rows["version"].isna()
    report.skip("no registry version (the server was not following an alias)", int(unversioned.sum()))
    newest = rows[~unversioned].groupby("model_name")["version"].last().to_dict()  # what serves now, per model
    for (name, version), group in rows[~unversioned].groupby(["model_name", "version"], sort=False):
        key = version_key(name, version)
        vs = state.versions.setdefault(key, VersionState())
        group = group[group["id"] > vs.consumed_through]
        n_windows = len(group) // cfg.window
        if n_windows:
            tracker = tracker or _tracker(params, root)
            ref, cal = _reference(params, name, version, report, tracker)
            if ref is None:
                report.skip(f"no reference for {key}", len(group))
                vs.consumed_through = int(group["id"].iloc[-1])
                continue
            run_id = report.run_ids.get(key) or tracker.run_for(name, version, _run_params(cfg, cal))
            report.run_ids[key] = run_id
        for k in range(n_windows):
            window = group.iloc[k * cfg.window : (k + 1) * cfg.window]
            last_event = max((v.last_event_at for k, v in state.versions.items()
                              if k.startswith(version_key(name, "")) and v.last_event_at is not None), default=None)
            record = _check_window(window, name, version, vs, ref, cal, rule, cfg.cooldown_s, now(), last_event)
            tracker.log_check(run_id, record.step, {**record.result.as_metrics(), "drift": float(record.drift),
                                                    "event": float(record.event)})  # fmt: skip
            report.checks.append(record)
            if record.event:
                on_drift(record)
            state.save(state_file)  # a reported drift is never reported twice, whatever fails next
        tail = group.iloc[n_windows * cfg.window :]
        if tail.empty:
            continue
        if newest.get(name) != version:  # the server moved on to another version: this tail never fills
            report.skip(f"tail of {key} after the server switched versions", len(tail))
            vs.consumed_through = int(tail["id"].iloc[-1])
        else:
            pending.append(int(tail["id"].iloc[0]))
    state.after_id = min(pending) - 1 if pending else int(rows["id"].iloc[-1])
    state.save(state_file)
    return report


def _check_window(
    window, name: str, version: str, vs: VersionState, ref: drift.Reference, cal: drift.Calibration,
    rule: drift.DriftRule, cooldown_s: float, at: float, last_event: float | None,
) -> CheckRecord:  # fmt: skip
    """One window's check. The cooldown is per model, not per version: the drift that retrained v1 is still
    there when v2, trained on part of it, starts serving, and it must not retrain again until `cooldown_s`."""
    elbo = window["elbo"].to_numpy(np.float64)
    result = drift.check(ref, cal, elbo, inference_log.latent_means(window))
    vs.step += 1
    vs.run_length, is_drift = rule.update(vs.run_length, result.over)
    event = is_drift and (last_event is None or at - last_event >= cooldown_s)
    if event:
        vs.last_event_at = at
        vs.events += 1
    vs.consumed_through = int(window["id"].iloc[-1])
    return CheckRecord(name, version, vs.step, int(window["id"].iloc[0]), vs.consumed_through, result, is_drift, event,
                       elbo)  # fmt: skip


def _tracker(params: Params, root: Path) -> MonitorTracker:
    return MonitorTracker(tracking.connect(Paths(root)), params.monitor.experiment)


def _reference(
    params: Params, name: str, version: str, report: MonitorReport, tracker: MonitorTracker
) -> tuple[drift.Reference | None, drift.Calibration | None]:
    """The version's reference and its calibration, fetched and computed once per pass."""
    key = version_key(name, version)
    if key in report.references:
        return report.references[key], report.calibrations[key]
    with tempfile.TemporaryDirectory() as tmp:
        path = tracker.reference_file(name, version, Path(tmp))
        if path is None:
            log.warning("%s v%s has no %s in its run: registered before the monitor, its traffic is not checked",
                        name, version, drift.REFERENCE_ARTIFACT)  # fmt: skip
            return None, None
        ref = drift.Reference.load(path)
    cfg = params.monitor
    cal = drift.calibrate(ref, cfg.window, cfg.false_alarm_rate, cfg.calibration_rounds, cfg.seed, cfg.mmd_decides)
    report.references[key], report.calibrations[key] = ref, cal
    return ref, cal


def _run_params(cfg, cal: drift.Calibration) -> dict[str, Any]:
    return {
        "window": cfg.window, "false_alarm_rate": cfg.false_alarm_rate, "consecutive": cfg.consecutive,
        "cooldown_s": cfg.cooldown_s, "calibration_rounds": cal.rounds, "calibrated_rate": round(cal.calibrated_rate, 5),
        "ks_threshold": cal.ks_threshold, "mmd_threshold": cal.mmd_threshold, "rbf_gamma": cal.gamma,
        "compare_size": len(cal.compare_idx), "mmd_decides": cal.mmd_decides,
    }  # fmt: skip


# ---------------------------------------------------------------- Prefect: the event and the artifact


def drift_event_resource(model_name: str, version: str) -> dict[str, str]:
    return {
        "prefect.resource.id": f"{RESOURCE_PREFIX}{model_name}",  # one cooldown per model, whatever version serves
        "prefect.resource.name": f"{model_name} v{version}",
        "vae.model.name": model_name,
        "vae.model.version": version,
    }


def emit_drift(record: CheckRecord) -> None:
    """The Prefect event the retraining automation waits for."""
    res = record.result
    payload = {
        "model_name": record.model_name, "version": record.version, "step": record.step,
        "first_id": record.first_id, "last_id": record.last_id, "window": res.n,
        "ks_elbo": res.ks_elbo, "ks_threshold": res.ks_threshold, "mmd_mu": res.mmd_mu,
        "mmd_threshold": res.mmd_threshold, "elbo_mean": res.elbo_mean, "ref_elbo_mean": res.ref_elbo_mean,
    }  # fmt: skip
    emit_event(event=DRIFT_EVENT, resource=drift_event_resource(record.model_name, record.version), payload=payload)


def picture(ref: drift.Reference, last: CheckRecord, timeline: dict[str, list[tuple[int, float]]]) -> bytes:
    """PNG: the reference's ELBO against the last window's, and each statistic against its threshold by check."""
    fig = Figure(figsize=(12, 3.6), dpi=80)
    ax_hist, ax_ks, ax_mmd = fig.subplots(1, 3)
    lo, hi = np.percentile(np.concatenate([ref.elbo, last.window_elbo]), [0.5, 99.5])
    bins = np.linspace(lo, hi, 40)
    ax_hist.hist(ref.elbo, bins=bins, density=True, alpha=0.5, label="reference (validation split)")
    ax_hist.hist(last.window_elbo, bins=bins, density=True, alpha=0.5, label=f"window {last.step}")
    ax_hist.set(title="ELBO per image (nats)", xlabel="ELBO")
    ax_hist.legend(fontsize=8)
    for ax, stat, thr, title in ((ax_ks, "ks_elbo", "ks_threshold", "KS of the ELBO"),
                                 (ax_mmd, "mmd_mu", "mmd_threshold", "MMD² of the latent means")):  # fmt: skip
        steps, values = zip(*timeline[stat]) if timeline.get(stat) else ((), ())
        ax.plot(steps, values, marker=".", label="window")
        if timeline.get(thr):
            ax.plot(*zip(*timeline[thr]), linestyle="--", color="grey", label="threshold")
        for step, flagged in timeline.get("event", []):
            if flagged:
                ax.axvline(step, color="red", alpha=0.6)
        ax.set(title=title, xlabel="check")
        ax.legend(fontsize=8)
    fig.suptitle(f"{last.model_name} v{last.version}: drift events in red", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def report_markdown(report: MonitorReport, pngs: dict[str, bytes]) -> str:
    lines = [f"# vae-monitor: {len(report.checks)} check(s), {report.rows_read} new row(s)", ""]
    if report.checks:
        lines += ["| version | check | rows | KS (ELBO) | threshold | MMD² (mu) | threshold | ELBO mean | drift |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for c in report.checks:
            r = c.result
            flag = "**event**" if c.event else ("yes (cooldown)" if c.drift else ("over" if r.over else ""))
            lines.append(f"| {c.model_name} v{c.version} | {c.step} | {c.first_id}-{c.last_id} | {r.ks_elbo:.3f} | "
                         f"{r.ks_threshold:.3f} | {r.mmd_mu:.2e} | {r.mmd_threshold:.2e} | {r.elbo_mean:.1f} "
                         f"(ref {r.ref_elbo_mean:.1f}) | {flag} |")  # fmt: skip
    for reason, n in report.skipped.items():
        if n:
            lines.append(f"\nNot checked: {n} row(s), {reason}.")
    for key, png in pngs.items():
        lines += ["", f"## {key}", "", f"![{key}](data:image/png;base64,{base64.b64encode(png).decode()})"]
    return "\n".join(lines) + "\n"


def publish(report: MonitorReport, tracker: MonitorTracker | None) -> str:
    """The markdown artifact of this pass; each checked version's picture also goes to its MLflow run."""
    pngs: dict[str, bytes] = {}
    if tracker is not None:
        for key, run_id in report.run_ids.items():
            last = [c for c in report.checks if version_key(c.model_name, c.version) == key][-1]
            timeline = {k: tracker.history(run_id, k) for k in ("ks_elbo", "ks_threshold", "mmd_mu", "mmd_threshold",
                                                                 "event")}  # fmt: skip
            pngs[key] = picture(report.references[key], last, timeline)
            tracker.log_png(run_id, pngs[key], "timeline.png")
    markdown = report_markdown(report, pngs)
    create_markdown_artifact(markdown, key=ARTIFACT_KEY, description="recorded traffic against the served version's reference")
    return markdown


@flow(name=MONITOR_FLOW, description="Recorded traffic against the served version's reference; a drift emits vae.drift.detected.")
def vae_monitor() -> dict[str, Any]:
    """One pass of the monitor in the checkout holding this code; returns a summary."""
    logger = get_run_logger()
    root = checkout()
    check_pinned_commit(root)
    params = load_params(root / "params.yaml")
    report = monitor_once(params, root, on_drift=emit_drift)
    tracker = _tracker(params, root) if report.run_ids else None
    publish(report, tracker)
    for c in report.checks:
        logger.info("%s v%s check %d: KS %.3f (threshold %.3f), MMD² %.2e (threshold %.2e)%s", c.model_name,
                    c.version, c.step, c.result.ks_elbo, c.result.ks_threshold, c.result.mmd_mu,
                    c.result.mmd_threshold, "  DRIFT: event emitted" if c.event else "")  # fmt: skip
    if not report.checks:
        logger.info("%d new row(s); no full window of %d images yet", report.rows_read, params.monitor.window)
    return summary(report)


def summary(report: MonitorReport) -> dict[str, Any]:
    return {
        "rows_read": report.rows_read,
        "checks": len(report.checks),
        "over": sum(c.result.over for c in report.checks),
        "drift_events": [f"{c.model_name} v{c.version} check {c.step}" for c in report.checks if c.event],
        "skipped": report.skipped,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.monitor", description=__doc__.splitlines()[0])
    cli_args.add_root_arg(parser, default=None, help="the checkout to monitor from (default: this one)")
    args = parser.parse_args(argv)
    try:
        with in_checkout(resolve_root(args.root)):
            result = vae_monitor()
    except VaeMlopsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
