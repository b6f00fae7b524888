"""`make loop-demo`: the closed loop on this machine, from served traffic to a new champion, in a few minutes.

In a scratch checkout (`.loop-demo/work/`, a copy of this project's pipeline with its own git
commit, DVC repo, MLflow store and inference table) it:

1. trains, evaluates and registers a first champion (`dvc repro`, `--epochs` epochs on MNIST);
2. starts a Prefect server (127.0.0.1, an auth string), deploys the monitor, the drift automation
   and `vae-retrain`, and a process worker; starts the scoring server on the champion (it follows the alias);
3. replays traffic, one monitor check per `monitor.window` images:
   (a) MNIST test digits, (b) a shift: Fashion-MNIST test images (or MNIST digits turned a quarter when no
   Fashion-MNIST mirror is found), until the monitor finds drift and the automation starts `vae-retrain`,
   which collects the recorded images into a snapshot, trains on it and gates the new version on the new
   test split; (c) more of the shifted traffic once the server answers with the new champion;
4. stops everything it started and writes `reports/loop.html` and `reports/loop.json` in this checkout.

Nothing in this checkout changes but those two files. See docs/loop.md.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

import numpy as np
import yaml
from prefect import Flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
from prefect.client.schemas.sorting import FlowRunSort
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

from pipeline import deploy, dvcrun, monitor, serve
from pipeline.retrain import ENTRYPOINT, RETRAIN_FLOW
from vae_mlops import data, inference_log, loop_report, pyfunc
from vae_mlops.datasets import get_dataset
from vae_mlops.errors import VaeMlopsError
from vae_mlops.params import Params, apply_overrides, load_params, read_raw
from vae_mlops.paths import Paths
from vae_mlops.ports import LOOPBACK, free_port

log = logging.getLogger("loop-demo")

ROOT = Path(__file__).resolve().parents[1]
REQUEST_IMAGES = 50  # images per request: a client batching its traffic
FASHION_ENV = "VAE_FASHION_MIRROR"  # a folder holding Fashion-MNIST's IDX files; default: beside VAE_DATA_MIRROR


class DemoError(VaeMlopsError):
    """A step of the demo failed; the message names it and where its log is."""


@dataclass(frozen=True)
class Settings:
    """What the demo runs with: every value a command-line option (`make loop-demo EPOCHS=2`)."""

    epochs: int
    window: int
    phase_a_checks: int
    phase_c_checks: int
    max_phase_b_checks: int
    iwae_samples: int
    holdout: float
    poll_s: float
    retrain_timeout_s: float
    traffic_gap_s: float
    burst: int
    workdir: Path
    out: Path


# ---------------------------------------------------------------- the scratch checkout


def make_workspace(s: Settings) -> Path:
    """A fresh copy of the pipeline with the demo's params, committed (deployments pin a commit)."""
    work = s.workdir / "work"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    dvcrun.copy_pipeline(ROOT, work)
    overrides = {
        "data.dataset": "mnist", "data.snapshots": [], "data.incoming_holdout": s.holdout,
        "train.epochs": s.epochs, "train.image_every": max(1, s.epochs), "evaluate.iwae_samples": s.iwae_samples,
        "monitor.window": s.window,
    }  # fmt: skip
    (work / "params.yaml").write_text(yaml.safe_dump(apply_overrides(read_raw(ROOT / "params.yaml"), overrides),
                                                     sort_keys=False))  # fmt: skip
    load_params(work / "params.yaml")  # every problem now, before anything runs
    git = ["git", "-c", "user.name=loop-demo", "-c", "user.email=loop-demo@localhost"]
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], [*git, "commit", "-qm", "loop demo"]):
        subprocess.run(cmd, cwd=work, check=True, capture_output=True)
    return work


def run_logged(cmd: list[str], cwd: Path, env: dict[str, str], what: str, timeout_s: float) -> None:
    try:
        dvcrun.run_logged(cmd, cwd, log, timeout_s, env)
    except dvcrun.CommandFailed as exc:
        raise DemoError(f"{what} failed: {exc}") from None


# ---------------------------------------------------------------- traffic


def idx_images(folder: Path, name: str = "t10k-images-idx3-ubyte") -> np.ndarray:
    """(N, 784) uint8 of an IDX images file (gzipped or not) in `folder`."""
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            raw = candidate.read_bytes()
            raw = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
            return np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 784)
    raise FileNotFoundError(folder / name)


def shifted_traffic(digits: np.ndarray) -> tuple[np.ndarray, str]:
    """Fashion-MNIST test images from a mirror folder, else the digits turned a quarter."""
    mirror = os.environ.get(FASHION_ENV) or str(Path(os.environ.get(data.MIRROR_ENV, "")).parent / "fashion-mnist")
    try:
        return idx_images(Path(mirror)), f"Fashion-MNIST test images ({mirror})"
    except FileNotFoundError:
        turned = np.rot90(digits.reshape(-1, 28, 28), k=1, axes=(1, 2)).reshape(-1, 784)
        return np.ascontiguousarray(turned[::-1]), "MNIST test digits turned a quarter (no Fashion-MNIST mirror)"


class Client:
    """The scoring server as a client sees it: base64 images in, ELBO and the answering version out."""

    def __init__(self, port: int) -> None:
        self.url = f"http://{LOOPBACK}:{port}"

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/ping", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def elbo(self, images: np.ndarray) -> tuple[np.ndarray, str]:
        body = json.dumps({"inputs": pyfunc.encode_images(images), "params": {"output": "elbo"}}).encode()
        request = urllib.request.Request(f"{self.url}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=120) as resp:
            out = json.loads(resp.read())["predictions"]
        return np.asarray(out["values"], dtype=np.float64), str(out.get("version"))


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.5) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise DemoError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(poll_s)


# ---------------------------------------------------------------- the loop


class Loop:
    """The running demo: sends traffic, runs monitor checks, and keeps the timeline."""

    def __init__(self, s: Settings, work: Path, client: Client) -> None:
        self.s, self.work, self.client = s, work, client
        self.t0, self.t0_wall = time.monotonic(), time.time()
        self.sent = 0
        self.timeline = loop_report.Timeline(title="The closed loop: served traffic, drift, retraining, a new champion")
        self.elbos: dict[str, list[float]] = {"a": [], "b": [], "c": []}
        self.versions: list[str] = []
        self.retrainings: int | None = None  # vae-retrain flow runs at the end, all told

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 2)

    def mark(self, kind: str, label: str, at_wall: float | None = None) -> None:
        """A marker now, or at the Unix time `at_wall` (a flow run's start, a promotion's record)."""
        at = self.now() if at_wall is None else round(at_wall - self.t0_wall, 2)
        self.timeline.markers.append(loop_report.Marker(at, kind, label))
        log.info("[%6.1f s] %s: %s", at, loop_report.MARKER_KINDS[kind][1], label)

    def send_window(self, phase: str, images: np.ndarray) -> None:
        """One window of traffic in requests of REQUEST_IMAGES images; waits until the recorder has it."""
        for start in range(0, len(images), REQUEST_IMAGES):
            values, version = self.client.elbo(images[start : start + REQUEST_IMAGES])
            self.elbos[phase].extend(values.tolist())
            self.versions.append(version)
        self.sent += len(images)
        url = inference_log.reader_url(self.work)
        wait_for(lambda: _rows(url) >= self.sent, 30, "the scoring server recording the window")

    def check(self, phase: str) -> list[loop_report.Check]:
        """One monitor check now (what the cron deployment runs), its windows added to the timeline."""
        params = load_params(self.work / "params.yaml")
        report = monitor.monitor_once(params, self.work, on_drift=monitor.emit_drift)  # a drift: the Prefect event
        checks = [_as_check(r, self.now(), phase, self.sent) for r in report.checks]
        self.timeline.checks.extend(checks)
        for c in checks:
            log.info("[%6.1f s] check v%s: ELBO %.1f (ref %.1f) KS %.3f/%.3f MMD %.4f/%.4f%s", c.time, c.version,
                     c.elbo_mean, c.ref_elbo_mean, c.ks_elbo, c.ks_threshold, c.mmd_mu, c.mmd_threshold,
                     "  DRIFT" if c.drift else "  over" if c.over else "")  # fmt: skip
        return checks


def _rows(url: str) -> int:
    """Rows recorded so far (0 before the table exists)."""
    if not inference_log.table_exists(url):
        return 0
    return len(inference_log.read_since(url, after_id=0, with_images=False))


def _as_check(r: monitor.CheckRecord, time_s: float, phase: str, images: int) -> loop_report.Check:
    """A monitor check as a point of the timeline; `drift`: it emitted the event (the cooldown lets one through)."""
    res = r.result
    return loop_report.Check(
        time=time_s, phase=phase, version=str(r.version), images=images,
        elbo_mean=float(res.elbo_mean), ref_elbo_mean=float(res.ref_elbo_mean),
        ks_elbo=float(res.ks_elbo), ks_threshold=float(res.ks_threshold),
        mmd_mu=float(res.mmd_mu), mmd_threshold=float(res.mmd_threshold),
        over=bool(res.over), drift=bool(r.event),
    )  # fmt: skip


def retrain_runs(client) -> list:
    return client.read_flow_runs(
        deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[RETRAIN_FLOW])),
        sort=FlowRunSort.START_TIME_ASC,
    )


def promotion(work: Path, after_version: str) -> dict | None:
    """The last promotion of a version other than the one served before, as the promotion log holds it."""
    log_path = Paths(work).promotion_log
    if not log_path.is_file():
        return None
    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    promoted = [r for r in rows if r.get("decision") == "promoted" and str(r["version"]) != after_version]
    return promoted[-1] if promoted else None


def run_loop(loop: Loop, digits: np.ndarray, shifted: np.ndarray, shift_name: str) -> None:
    s, w = loop.s, loop.s.window
    t = loop.timeline
    # phase a: in-distribution traffic; every alarm here is a false one
    start = loop.now()
    for i in range(s.phase_a_checks):
        loop.send_window("a", digits[i * w : (i + 1) * w])
        loop.check("a")
    t.phases.append(loop_report.Phase("a", start, loop.now(), "MNIST test digits"))
    served_before = loop.versions[-1]
    # phase b: the shift, until the automation starts a retraining
    start, used, found = loop.now(), 0, None
    with get_client(sync_client=True) as client:
        known_runs = {r.id for r in retrain_runs(client)}
        for _ in range(s.max_phase_b_checks):
            for _ in range(s.burst):  # traffic does not wait for the monitor's schedule
                loop.send_window("b", shifted[used : used + w])
                used += w
            checks = loop.check("b")
            if any(c.drift for c in checks):
                found = loop.now()
                nth = sum(c.phase == "b" for c in loop.timeline.checks) - len(checks) + \
                    next(i for i, c in enumerate(checks) if c.drift) + 1
                loop.mark("drift", f"v{served_before}: in shifted window {nth} ({nth * w} images); "
                                   f"{loop.sent - s.phase_a_checks * w} shifted images recorded")  # fmt: skip
                break
        if found is None:
            raise DemoError(f"no drift found in {s.max_phase_b_checks * s.burst} windows of shifted traffic")
        run = None

        def started() -> bool:
            nonlocal run
            runs = [r for r in retrain_runs(client) if r.id not in known_runs]
            run = runs[0] if runs else None
            return run is not None

        wait_for(started, 300, "the automation starting vae-retrain", poll_s=1)
        loop.mark("retrain", f"flow run {run.name} of vae-retrain (automation vae-drift-retrain)",
                  run.start_time.timestamp() if run.start_time else None)
        log.info("retraining: collect, dvc add, train, evaluate, register (see %s)", loop.s.workdir / "logs")
        deadline = time.monotonic() + s.retrain_timeout_s
        next_window = time.monotonic()
        while True:  # shifted traffic goes on while the new model trains: the old champion answers it
            state = client.read_flow_run(run.id).state
            if state is not None and state.is_final():
                break
            if time.monotonic() > deadline:
                raise DemoError(f"vae-retrain run {run.name} did not finish within {s.retrain_timeout_s:.0f} s")
            if time.monotonic() >= next_window and used + w <= len(shifted) // 2:  # the other half is phase c's
                loop.send_window("b", shifted[used : used + w])  # the drift goes on: no second retraining
                used += w
                loop.check("b")
                next_window = time.monotonic() + s.traffic_gap_s
            time.sleep(2)
        if not state.is_completed():
            raise DemoError(f"vae-retrain run {run.name} ended {state.type.value}: {state.message}")
    decision = promotion(loop.work, served_before)
    if decision is None:
        t.notes.append("the retrained version did not win the gate: the champion stays (see reports/promotions.jsonl)")
    else:
        new_version = str(decision["version"])
        loop.mark("promoted", f"v{new_version} champion: {decision['reason']}",
                  datetime.fromisoformat(decision["time"]).timestamp())
        switched = lambda: loop.client.elbo(shifted[:1])[1] == new_version  # noqa: E731
        wait_for(switched, 120, f"the scoring server serving v{new_version}", poll_s=1)
        loop.mark("switched", f"the scoring server answers with v{new_version} (no restart)")
    t.phases.append(loop_report.Phase("b", start, loop.now(), shift_name))
    # phase c: the same kind of shifted traffic, other images, to the new champion
    start = loop.now()
    for i in range(s.phase_c_checks):
        loop.send_window("c", shifted[used : used + w])
        used += w
        loop.check("c")
    t.phases.append(loop_report.Phase("c", start, loop.now(), f"{shift_name}, after the switch"))
    with get_client(sync_client=True) as client:
        loop.retrainings = len(retrain_runs(client))


def measures(loop: Loop) -> dict[str, str]:
    """The loop's numbers, from the timeline."""
    t, w = loop.timeline, loop.s.window
    a = [c for c in t.checks if c.phase == "a"]
    b = [c for c in t.checks if c.phase == "b"]
    marks = {m.kind: m.time for m in t.markers}
    first_b = min((c.time for c in b), default=None)
    drift_at = next((i for i, c in enumerate(b) if c.drift), None)
    out = {
        "false alarms in phase a": f"{sum(c.over for c in a)} windows over a threshold, "
                                   f"{sum(c.drift for c in a)} drift events, in {len(a)} checks",
        "detection delay": "no drift found" if drift_at is None else
                           f"{(drift_at + 1) * w} shifted images: window {drift_at + 1} of phase b, found by the "
                           f"monitor's check number {-(-(drift_at + 1) // loop.s.burst)} (one check per "
                           f"{loop.s.burst * w} images)",
        "detection to new champion promoted": _secs(marks, "drift", "promoted"),
        "detection to the new champion answering": _secs(marks, "drift", "switched"),
        "served ELBO, shifted traffic, old champion (phase b)": _nats(loop.elbos["b"]),
        "served ELBO, shifted traffic, new champion (phase c)": _nats(loop.elbos["c"]),
        "served ELBO, MNIST digits (phase a)": _nats(loop.elbos["a"]),
    }  # fmt: skip
    if first_b is None:
        out["detection delay"] = "phase b did not run"
    elif drift_at is not None and a and a[-1].over and all(c.over for c in b[: drift_at + 1]):
        out["detection delay"] += f" (with phase a's last window, a false 'over': {loop.s.window} images sooner)"
    out["vae-retrain runs"] = "—" if loop.retrainings is None else str(loop.retrainings)
    out["drift events in phases b and c"] = str(sum(c.drift for c in t.checks if c.phase != "a"))
    return out


def _secs(marks: dict[str, float], a: str, b: str) -> str:
    return f"{marks[b] - marks[a]:.1f} s" if a in marks and b in marks else "—"


def _nats(values: list[float]) -> str:
    return f"{np.mean(values):.1f} nats per image ({len(values)} images)" if values else "—"


# ---------------------------------------------------------------- processes


def deploy_retrain(work: Path, params: Params) -> None:
    """`vae-retrain` on the cpu pool, pinned like the others, and the drift automation pointed at it."""
    pin = deploy.resolve_commit(work)
    retrain = Flow.from_source(deploy.pinned_source(str(work), pin), ENTRYPOINT)
    dep_id = retrain.deploy(
        name=RETRAIN_FLOW, work_pool_name=params.orchestrate.cpu_pool, concurrency_limit=1, tags=["vae", "retrain"],
        description="Collect the recorded traffic as a snapshot, then train on it through the gate.",
        build=False, push=False, print_next_steps=False, ignore_warnings=True,
        job_variables={"env": deploy.job_env()}, version=pin,
    )  # fmt: skip
    deploy.declare_drift_automation(dep_id, params.monitor.cooldown_s)


def start_scoring_server(work: Path, port: int, env: dict[str, str], s: Settings, logs: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "vae_mlops", "serve-model", "--root", str(work), "--port", str(port),
           "--poll-s", str(s.poll_s)]  # fmt: skip
    out = open(logs / "scoring-server.log", "ab")
    return subprocess.Popen(cmd, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip


def demo(s: Settings) -> loop_report.Timeline:
    logs = s.workdir / "logs"
    work = make_workspace(s)
    logs.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
    code = {"PYTHONPATH": os.pathsep.join([str(work / "src"), str(work)])}  # every process runs the committed copy
    env = dvcrun.tool_env({"MLFLOW_TRACKING_URI": tracking_uri, "PREFECT_HOME": str(s.workdir / "prefect"), **code})
    log.info("workspace %s; training the first champion (%d epochs)", work, s.epochs)
    run_logged([dvcrun.dvc_bin(), "repro"], work, env, "the first pipeline run (dvc repro)", 3600)
    digits, _ = data.load_split(Paths(work).raw_dir("mnist"), get_dataset("mnist"), "test")  # phase a's traffic
    digits = digits.numpy()
    shifted, shift_name = shifted_traffic(digits)
    # Clients arrive in no order: the test set's own order is not (its first half is the cleaner writers)
    digits = digits[np.random.default_rng(0).permutation(len(digits))]
    shifted = shifted[np.random.default_rng(1).permutation(len(shifted))]
    params = load_params(work / "params.yaml")
    auth = f"loop:{secrets.token_urlsafe(18)}"  # this demo's Prefect server only; never printed
    with ExitStack() as stack:
        api_url = stack.enter_context(serve.local_server(s.workdir / "prefect", free_port(), auth, ui=False,
                                                         extra_env={"MLFLOW_TRACKING_URI": tracking_uri}))  # fmt: skip
        stack.enter_context(temporary_settings(updates={PREFECT_API_URL: api_url, PREFECT_API_AUTH_STRING: auth}))
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri  # the deployments forward it to their runs
        deploy.deploy_all(work, params)
        deploy_retrain(work, params)
        worker = serve.start_worker(params.orchestrate.cpu_pool, api_url, s.workdir / "prefect",
                                    extra_env={"PREFECT_API_AUTH_STRING": auth, "MLFLOW_TRACKING_URI": tracking_uri,
                                               **code},
                                    stdout=open(logs / "worker.log", "ab"), stderr=subprocess.STDOUT)  # fmt: skip
        stack.callback(serve.stop, worker)
        port = free_port()
        server = start_scoring_server(work, port, env, s, logs)
        stack.callback(serve.stop, server)
        client = Client(port)
        wait_for(lambda: client.ready() or server.poll() is not None, 180, "the scoring server starting")
        if server.poll() is not None:
            raise DemoError(f"the scoring server exited ({server.returncode}); see {logs / 'scoring-server.log'}")
        here = Path.cwd()
        os.chdir(work)  # the monitor's state and the inference table default to the working directory
        stack.callback(os.chdir, here)
        loop = Loop(s, work, client)
        loop.timeline.settings = {
            "epochs": s.epochs, "monitor.window": s.window, "monitor.consecutive": params.monitor.consecutive,
            "monitor.false_alarm_rate": params.monitor.false_alarm_rate, "data.incoming_holdout": s.holdout,
            "data.incoming_max_fraction": params.data.incoming_max_fraction, "scoring server poll (s)": s.poll_s,
            "machine": f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
        }  # fmt: skip
        try:
            run_loop(loop, digits, shifted, shift_name)
        finally:  # what ran is reported, also when a step failed
            loop.timeline.measures = measures(loop)
            html, js = loop_report.write(loop.timeline, s.out)
            log.info("wrote %s and %s", html, js)
    return loop.timeline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.loop_demo", description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1, help="epochs of each training (default 1)")
    parser.add_argument("--window", type=int, default=200, help="images per monitor window (monitor.window)")
    parser.add_argument("--phase-a-checks", type=int, default=20, help="monitor checks of MNIST traffic")
    parser.add_argument("--phase-c-checks", type=int, default=4, help="monitor checks after the switch")
    parser.add_argument("--max-phase-b-checks", type=int, default=4, help="give up when no drift is found by then")
    parser.add_argument("--iwae-samples", type=int, default=10, help="evaluate.iwae_samples (the gate's metric)")
    parser.add_argument("--holdout", type=float, default=0.5, help="data.incoming_holdout of the demo")
    parser.add_argument("--poll-s", type=float, default=2.0, help="how often the server reads the champion alias")
    parser.add_argument("--retrain-timeout-s", type=float, default=1800.0)
    parser.add_argument("--burst", type=int, default=5,
                        help="windows of shifted traffic between two monitor checks in phase b (default 5)")
    parser.add_argument("--traffic-gap-s", type=float, default=30.0,
                        help="seconds between windows of shifted traffic while the retraining runs")
    parser.add_argument("--workdir", type=Path, default=ROOT / ".loop-demo")
    parser.add_argument("--out", type=Path, default=Paths(ROOT).reports_dir / "loop.html")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    for chatty in ("httpx", "mlflow"):  # a line per request or artifact download would bury the loop's own lines
        logging.getLogger(chatty).setLevel(logging.WARNING)
    s = Settings(args.epochs, args.window, args.phase_a_checks, args.phase_c_checks, args.max_phase_b_checks,
                 args.iwae_samples, args.holdout, args.poll_s, args.retrain_timeout_s, args.traffic_gap_s,
                 args.burst, args.workdir.resolve(),
                 args.out.resolve())  # fmt: skip
    try:
        timeline = demo(s)
    except (VaeMlopsError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for k, v in timeline.measures.items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
