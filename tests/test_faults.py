"""Faults injected for real, in subprocesses: nothing saved is lost, the error says what to do, a rerun completes."""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support.checkpoints import checkpoints, same_weights, wait_for
from tests.support.e2e import copy_project, dvc, tool_env
from tests.support.mlflow_store import MlflowServer, free_port, mlflow_server
from vae_mlops import checkpoint

pytestmark = pytest.mark.slow


def cli(*args: str, cwd: Path, limit_bytes: int | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """`python -m vae_mlops ...`, optionally with a file-size limit that makes writes fail like a full disk."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    proc = subprocess.run(
        [sys.executable, "-m", "vae_mlops", *args], cwd=cwd, env=tool_env(), capture_output=True, text=True,
        preexec_fn=limit if limit_bytes else None, timeout=300,
    )
    if check and proc.returncode:
        raise AssertionError(proc.stderr)
    return proc


@pytest.fixture
def mirror_env(data_env, monkeypatch):
    monkeypatch.setenv("VAE_DATA_MIRROR", f"file://{data_env}")
    return data_env


EPOCHS = {"train.epochs": 40}


def test_sigkill_mid_training_then_dvc_repro_resumes_to_the_same_weights(mirror_env, tmp_path):
    straight = copy_project(tmp_path / "straight", **EPOCHS)
    dvc("repro", cwd=straight)
    killed = copy_project(tmp_path / "killed", **EPOCHS)
    proc = subprocess.Popen([str(Path(sys.executable).parent / "dvc"), "repro"], cwd=killed, env=tool_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    wait_for(lambda: any(p.name == "epoch-0003.pt" for p in checkpoints(killed)), proc=proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "models" / "vae.pt").exists()
    out = dvc("repro", cwd=killed)
    assert "resuming from checkpoint" in out.stdout + out.stderr
    assert same_weights(straight / "models" / "vae.pt", killed / "models" / "vae.pt")


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(mirror_env, tmp_path):
    repo = copy_project(tmp_path / "repo", **{"train.epochs": 3})
    cli("download", cwd=repo, check=True)
    cli("train", cwd=repo, check=True)
    reference = tmp_path / "reference.pt"
    reference.write_bytes((repo / "models" / "vae.pt").read_bytes())
    latest = checkpoints(repo)[-1]
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # truncated
    (repo / "models" / "vae.pt").unlink()
    proc = cli("train", cwd=repo, check=True)
    assert "skipping a bad checkpoint" in proc.stderr and "checksum mismatch" in proc.stderr
    assert "resuming from checkpoint" in proc.stderr and "epoch 2" in proc.stderr
    assert same_weights(reference, repo / "models" / "vae.pt")


def test_diverging_training_stops_the_pipeline_before_anything_downstream(mirror_env, tmp_path):
    repo = copy_project(tmp_path / "repo", **{"train.lr": 1000.0})
    out = dvc("repro", cwd=repo, check=False)
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert "loss became NaN/inf at epoch 1, batch" in text and "Traceback" not in text
    assert not (repo / "models" / "vae.pt").exists() and not (repo / "reports" / "metrics.json").exists()


def test_second_dvc_repro_in_the_same_repo_is_refused(mirror_env, tmp_path):
    repo = copy_project(tmp_path / "repo", **EPOCHS)
    first = subprocess.Popen([str(Path(sys.executable).parent / "dvc"), "repro"], cwd=repo, env=tool_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: bool(checkpoints(repo)), proc=first)
    params_before = (repo / "params.yaml").read_bytes()
    second = dvc("repro", cwd=repo, check=False)
    assert second.returncode != 0
    text = " ".join((second.stdout + second.stderr).split())  # DVC wraps its message to the terminal width
    # dvc/rwlock.py's own words: while the first runs train's command it holds train's deps and outs
    assert f"'{repo}/data/raw/tiny' is busy, it is being blocked by: (PID {first.pid}):" in text, text
    assert f"remove '{repo}/.dvc/tmp/rwlock' and try again" in text, text
    assert "Traceback" not in text and (repo / "params.yaml").read_bytes() == params_before
    assert first.wait(timeout=300) == 0, first.stdout.read()
    assert "up to date" in dvc("status", cwd=repo).stdout
    assert checkpoint.load_model(repo / "models" / "vae.pt")[1]["epoch"] == 40


def test_mirror_that_never_answers_fails_within_the_timeout(tiny_mirror, tmp_path, monkeypatch):
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    threading.Thread(target=lambda: [held.append(server.accept()[0]) for _ in range(20)], daemon=True).start()
    monkeypatch.setenv("VAE_DATA_MIRROR", f"http://127.0.0.1:{server.getsockname()[1]}/")
    repo = copy_project(tmp_path / "repo", **{"data.timeout_s": 1.0, "data.retries": 2})
    start = time.monotonic()
    proc = cli("download", cwd=repo)
    elapsed = time.monotonic() - start
    server.close()
    assert proc.returncode == 2 and "unreachable after 2 attempt(s)" in proc.stderr
    assert elapsed < 60
    assert not (repo / "data" / "raw" / "tiny").exists()


def test_disk_full_while_writing_the_dataset_leaves_data_empty(mirror_env, tmp_path):
    repo = copy_project(tmp_path / "repo")
    proc = cli("download", cwd=repo, limit_bytes=100_000)  # train images are 470 kB
    assert proc.returncode == 2 and "could not write" in proc.stderr and "Free disk space" in proc.stderr
    assert "Traceback" not in proc.stderr
    raw = repo / "data" / "raw"
    assert not raw.exists() or list(raw.iterdir()) == []
    cli("download", cwd=repo, check=True)  # a rerun completes


def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_one(mirror_env, tmp_path):
    # hidden 400: a checkpoint (~8 MB) well above the MLflow sqlite store (~1 MB), so the limit hits the checkpoint
    repo = copy_project(tmp_path / "repo", **{"train.epochs": 1, "model.hidden_dim": 400})
    cli("download", cwd=repo, check=True)
    cli("train", cwd=repo, check=True)
    before = {p: p.read_bytes() for p in (repo / "models").rglob("*.pt*")}
    size = max(len(b) for b in before.values())
    params = (repo / "params.yaml").read_text().replace("epochs: 1", "epochs: 2")
    (repo / "params.yaml").write_text(params)
    proc = cli("train", cwd=repo, limit_bytes=size // 2)
    assert proc.returncode == 2 and "could not write" in proc.stderr and "Traceback" not in proc.stderr
    assert {p: p.read_bytes() for p in before} == before
    assert not [p for p in (repo / "models").rglob("*.tmp")]
    cli("train", cwd=repo, check=True)  # disk freed: the rerun resumes and completes
    assert checkpoint.load_model(repo / "models" / "vae.pt")[1]["epoch"] == 2


# ---------------------------------------------------------------- the MLflow tracking server


def _epochs_logged(server: MlflowServer, run_file: Path) -> int:
    """How many epochs of `train/loss` the server holds for the run the train stage recorded (0 before it exists)."""
    if not run_file.is_file():
        return 0
    try:
        return len(server.metric_steps(json.loads(run_file.read_text())["run_id"], "train/loss"))
    except (ValueError, OSError):  # the run file mid-write, or the server busy
        return 0


def _files(folder: Path) -> dict[Path, tuple[int, bytes]]:
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_mlflow_server_dying_mid_run_keeps_training_and_a_rerun_registers_without_retraining(mirror_env, tmp_path):
    repo = copy_project(tmp_path / "repo", **EPOCHS)
    epochs = EPOCHS["train.epochs"]
    with mlflow_server(tmp_path / "mlflow") as server:
        env = tool_env(MLFLOW_TRACKING_URI=server.url)
        proc = subprocess.Popen([str(Path(sys.executable).parent / "dvc"), "repro"], cwd=repo, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        run_file = repo / "reports" / "mlflow_run.json"
        wait_for(lambda: _epochs_logged(server, run_file) >= 1, proc=proc)
        server.kill(signal.SIGKILL)  # the server and its workers, as in a crash or an OOM kill
        out, _ = proc.communicate(timeout=300)

        # Training went on to the end; its outputs are kept; the stage failed saying what to do.
        assert proc.returncode != 0
        lost = re.search(rf"error: lost the MLflow tracking store {re.escape(server.url)} at epoch (\d+)", out)
        assert lost and int(lost.group(1)) < epochs, out  # the server died mid-run, not after it
        assert f"epoch {epochs}/{epochs}" in out and "Training finished and its outputs are kept" in out
        assert "rerun `dvc repro`" in out and "Traceback" not in out
        assert checkpoint.load_model(repo / "models" / "vae.pt")[1]["epoch"] == epochs
        assert checkpoints(repo)[-1].name == f"epoch-{epochs:04d}.pt"
        for name in ("mlflow_run.json", "metrics.json", "registration.json", "promotions.jsonl"):
            assert not (repo / "reports" / name).exists(), name  # nothing evaluated or registered
        kept = _files(repo / "models" / "checkpoints")
        trained = tmp_path / "trained.pt"
        trained.write_bytes((repo / "models" / "vae.pt").read_bytes())
        old_run = re.search(r"\(run (\w+) stays incomplete\)", out).group(1)

        # The same server (port and store) back: the rerun logs and registers without a training epoch.
        server.start()
        rerun = dvc("repro", cwd=repo, env=env)
        text = rerun.stdout + rerun.stderr
        assert re.search(rf"resuming from checkpoint \w+ epoch {epochs}\b", text)
        assert not re.search(r"vae_mlops.stages.train: epoch \d+/", text)  # no epoch was trained
        assert _files(repo / "models" / "checkpoints") == kept
        assert same_weights(trained, repo / "models" / "vae.pt")

        runs = {r["info"]["run_id"]: r for r in server.runs("vae-mnist")}
        new_run = json.loads((repo / "reports" / "mlflow_run.json").read_text())["run_id"]
        assert set(runs) == {old_run, new_run}
        assert runs[old_run]["info"]["status"] == "RUNNING"  # incomplete, as the error said
        assert runs[new_run]["info"]["status"] == "FINISHED"
        assert server.metric_steps(new_run, "train/loss") == list(range(1, epochs + 1))  # every epoch, from history
        assert "test.nll_iwae" in runs[new_run]["data"]["metrics"]
        assert "images" in server.artifacts(new_run)  # the final epoch's grids, though no epoch ran
        champion = server.model_version("vae-mnist", "champion")
        assert champion["run_id"] == new_run
        registration = json.loads((repo / "reports" / "registration.json").read_text())
        assert (registration["version"], registration["alias"]) == (champion["version"], "champion")


def test_unreachable_mlflow_server_stops_dvc_repro_before_training(mirror_env, tmp_path):
    repo = copy_project(tmp_path / "repo")
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    out = dvc("repro", cwd=repo, env=tool_env(MLFLOW_TRACKING_URI=dead), check=False)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert f"error: the MLflow tracking server at {dead} is unreachable" in text and "Traceback" not in text
    assert "failed to reproduce 'train'" in text
    assert (repo / "data" / "raw" / "tiny").is_dir()  # download needs no tracking store and ran
    assert not (repo / "models").exists() and not (repo / "reports").exists()  # train stopped before any work


def test_mlflow_server_dying_during_evaluate_is_a_clear_error_and_a_rerun_completes(mirror_env, tmp_path):
    repo = copy_project(tmp_path / "repo", **{"train.epochs": 1})
    with mlflow_server(tmp_path / "mlflow") as server:
        env = tool_env(MLFLOW_TRACKING_URI=server.url)
        proc = subprocess.Popen([str(Path(sys.executable).parent / "dvc"), "repro"], cwd=repo, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        # evaluate writes metrics.json, draws its pictures, then logs both: the server dies in between
        wait_for(lambda: (repo / "reports" / "metrics.json").exists(), proc=proc)
        server.kill(signal.SIGKILL)
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode != 0 and "failed to reproduce 'evaluate'" in out
        assert f"error: lost the MLflow tracking store {server.url} during this stage" in out, out
        assert "rerun `dvc repro`" in out and "Traceback" not in out
        assert not (repo / "reports" / "registration.json").exists()

        server.start()
        rerun = dvc("repro", cwd=repo, env=env)
        assert "Stage 'train' didn't change, skipping" in rerun.stdout + rerun.stderr
        run_id = json.loads((repo / "reports" / "mlflow_run.json").read_text())["run_id"]
        (run,) = server.runs("vae-mnist")
        assert run["info"]["run_id"] == run_id and run["info"]["status"] == "FINISHED"
        assert "test.nll_iwae" in run["data"]["metrics"]
        assert server.model_version("vae-mnist", "champion")["run_id"] == run_id
