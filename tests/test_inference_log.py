"""The inference table: rows hold what the server answered, the reader validates, and a kill loses at most the bound.

The SIGKILL and SIGTERM tests run a real recording process and kill it; the rows it
said it had recorded are then looked up in the SQLite file it wrote.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
import torch

from tests.support.project import ROOT
from vae_mlops import inference_log, pyfunc
from vae_mlops.inference_log import InferenceLogError, Recorder
from vae_mlops.model import VAE, VAEConfig, elbo
from vae_mlops.ports import free_port
from vae_mlops.scores import ELBO_SEED, served_scores

FLUSH_S = 0.5
SIGKILL_BOUND_S = 1.0  # what docs/monitoring.md states a SIGKILL may lose: rows recorded in the last second


@pytest.fixture
def vae() -> VAE:
    torch.manual_seed(0)
    return VAE(VAEConfig(784, 32, 4, "bernoulli")).eval()


@pytest.fixture
def url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'inference.db'}"


def _images(n: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).integers(0, 256, (n, 784)) / 255).astype(np.float32)


def test_rows_hold_the_answered_images_with_the_scores_the_server_answers(vae, url):
    x = _images(7)
    rec = Recorder(url, log_inputs=True, flush_s=FLUSH_S)
    rec.record(vae, x[:3], model_name="vae-mnist", version="3")
    rec.record(vae, x[3:], model_name="vae-mnist", version="3")
    assert rec.flush() and rec.written == 7 and rec.dropped == 0
    rec.close()

    df = inference_log.read_since(url)
    assert df["id"].tolist() == list(range(1, 8))
    assert set(df["model_name"]) == {"vae-mnist"} and set(df["version"]) == {"3"}
    # independent of the recorder: the model's own ELBO with the fixed noise row, and its encoder's mean
    noise = torch.randn((1, 4), generator=torch.Generator().manual_seed(ELBO_SEED))
    with torch.no_grad():
        want_elbo = elbo(vae, torch.from_numpy(x), eps=noise).numpy()
        want_mu = vae.encode(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(df["elbo"].to_numpy(), want_elbo, rtol=1e-6)
    np.testing.assert_array_equal(inference_log.latent_means(df), want_mu)
    np.testing.assert_array_equal(inference_log.images(df), np.rint(x * 255).astype(np.uint8))
    assert (df["served_at"] > time.time() - 60).all()


def test_scores_are_what_output_elbo_answers(vae):
    """`pyfunc.compute` is the scoring server's own answer."""
    x = _images(5)
    np.testing.assert_allclose(served_scores(vae, x).elbo, pyfunc.compute(vae, x, "elbo"), rtol=1e-6)
    np.testing.assert_array_equal(served_scores(vae, x).mu, pyfunc.compute(vae, x, "mu"))


def test_log_inputs_off_keeps_the_scores_only(vae, url):
    rec = Recorder(url, log_inputs=False, flush_s=FLUSH_S)
    rec.record(vae, _images(4), model_name="vae-mnist", version="1")
    rec.close()
    df = inference_log.read_since(url)
    assert len(df) == 4 and df["image"].isna().all() and np.isfinite(df["elbo"]).all()
    with pytest.raises(InferenceLogError, match="4 of 4 rows hold no image"):
        inference_log.images(df)


def test_reader_pages_by_id_and_refuses_a_row_that_breaks_the_schema(vae, url, tmp_path):
    rec = Recorder(url, log_inputs=True, flush_s=FLUSH_S)
    rec.record(vae, _images(10), model_name="m", version="1")
    rec.close()
    assert inference_log.read_since(url, after_id=7)["id"].tolist() == [8, 9, 10]
    assert inference_log.read_since(url, after_id=2, limit=3)["id"].tolist() == [3, 4, 5]
    assert inference_log.read_since(url, after_id=10).empty
    assert inference_log.read_since(url, with_images=False)["image"].isna().all()

    with sqlite3.connect(tmp_path / "inference.db") as db:  # a mean of 3 floats where latent_dim says 4
        db.execute("INSERT INTO inference_log (served_at, elbo, latent_dim, mu) VALUES (1e9, -90.0, 4, ?)",
                   (np.zeros(3, "<f4").tobytes(),))  # fmt: skip
    with pytest.raises(InferenceLogError, match="latent_dim float32"):
        inference_log.read_since(url, after_id=10)


def test_a_failing_database_costs_rows_never_a_request(vae, url, tmp_path):
    rec = Recorder(url, log_inputs=True, flush_s=FLUSH_S)
    with sqlite3.connect(tmp_path / "inference.db") as db:
        db.execute("DROP TABLE inference_log")
    rec.record(vae, _images(3), model_name="m", version="1")  # does not raise
    assert rec.flush() and rec.dropped == 3 and rec.written == 0
    rec.close()


# ---------------------------------------------------------------- killing a real recording process

CHILD = """
import sys, time
import numpy as np
from vae_mlops.inference_log import Recorder
rec = Recorder(sys.argv[1], log_inputs=True, flush_s=float(sys.argv[2]))
x, mu = np.zeros((1, 784), np.float32), np.zeros((1, 4), np.float32)
i = 0
while True:
    rec.record(None, x, model_name="m", version="1", elbo=np.array([float(i)]), mu=mu)
    print(i, time.time(), flush=True)  # recorded: the parent holds the recorder to it
    i += 1
    time.sleep(0.002)
"""


def _run_and_signal(url: str, sig: int, run_s: float = 3.0) -> tuple[dict[int, float], float, int]:
    """Start a recording process, let it record for `run_s`, send `sig`: (seq -> time recorded, kill time, exit code)."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, url, str(FLUSH_S)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    said: dict[int, float] = {}

    def read() -> None:
        for line in proc.stdout:
            seq, at = line.split()
            said[int(seq)] = float(at)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while len(said) < 10:  # started (imports take a while on a busy machine)
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the recording process never started recording"
        time.sleep(0.05)
    time.sleep(run_s)
    killed_at = time.time()
    os.kill(proc.pid, sig)
    code = proc.wait(60)
    reader.join(10)
    return said, killed_at, code


def _recorded(url: str) -> set[int]:
    return {int(e) for e in inference_log.read_since(url)["elbo"]}


def test_sigkill_loses_at_most_the_last_second(url):
    said, killed_at, code = _run_and_signal(url, signal.SIGKILL)
    assert code == -signal.SIGKILL
    kept = _recorded(url)
    assert kept <= set(said)
    old_enough = {seq for seq, at in said.items() if at <= killed_at - SIGKILL_BOUND_S}
    assert len(old_enough) > 100
    lost = sorted(old_enough - kept)
    assert not lost, f"{len(lost)} rows recorded more than {SIGKILL_BOUND_S}s before the SIGKILL were lost: {lost[:10]}"
    lost_all = set(said) - kept
    span = (max(said[s] for s in lost_all) - min(said[s] for s in lost_all)) if lost_all else 0.0
    print(f"SIGKILL lost {len(lost_all)} of {len(said)} rows, spanning {span:.2f}s")


def test_sigterm_loses_nothing(url):
    said, _, code = _run_and_signal(url, signal.SIGTERM)
    assert code == -signal.SIGTERM  # the flush ran, then the process ended as SIGTERM ends it
    kept = _recorded(url)
    assert set(said) <= kept, f"{len(set(said) - kept)} recorded rows lost on SIGTERM"


# ---------------------------------------------------------------- PostgreSQL: an insert-only writer, a select-only reader

PG_ROLES_SQL = """
REVOKE ALL ON DATABASE inference FROM PUBLIC;
CREATE ROLE vae_recorder LOGIN PASSWORD '{rec}';
CREATE ROLE vae_monitor LOGIN PASSWORD '{mon}';
GRANT CONNECT ON DATABASE inference TO vae_recorder, vae_monitor;
"""
PG_GRANTS_SQL = """
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO vae_recorder, vae_monitor;
GRANT INSERT ON inference_log TO vae_recorder;
GRANT SELECT ON inference_log TO vae_monitor;
"""


def _pg_bin(name: str) -> str:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    if not found:
        pytest.fail(f"PostgreSQL's {name} is not installed: `make setup` installs it")
    return str(found[-1])


@pytest.fixture(scope="module")
def postgres():
    """A throwaway cluster on 127.0.0.1 with password authentication; yields (port, superuser password)."""
    # not under pytest's tmp folders: as root, PostgreSQL runs as `postgres`, which cannot enter those (0700)
    folder = Path(tempfile.mkdtemp(prefix="vae-pg-"))
    as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_pg:
        os.chmod(folder, 0o777)
    secret = "s3cret-for-tests"
    (folder / "pw").write_text(secret)
    os.chmod(folder / "pw", 0o644)
    data, port = folder / "data", free_port()
    subprocess.run([*as_pg, _pg_bin("initdb"), "-D", str(data), "-U", "vae", "--pwfile", str(folder / "pw"),
                    "--auth", "scram-sha-256"], check=True, capture_output=True)  # fmt: skip
    subprocess.run([*as_pg, _pg_bin("pg_ctl"), "start", "-w", "-D", str(data), "-l", str(folder / "log"), "-o",
                    f"-p {port} -k {folder} -c listen_addresses=127.0.0.1"], check=True, capture_output=True)  # fmt: skip
    try:
        yield port, secret
    finally:
        subprocess.run([*as_pg, _pg_bin("pg_ctl"), "stop", "-D", str(data), "-m", "fast", "-w"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_postgres_writer_may_only_insert_and_the_monitor_reads(postgres, vae, monkeypatch):
    port, secret = postgres
    admin = f"postgresql+psycopg://vae:{secret}@127.0.0.1:{port}"
    with sa.create_engine(f"{admin}/postgres", isolation_level="AUTOCOMMIT").connect() as conn:
        conn.execute(sa.text("CREATE DATABASE inference"))
        for stmt in PG_ROLES_SQL.format(rec="rec-pw", mon="mon-pw").strip().splitlines():
            conn.execute(sa.text(stmt))
    inference_log.ensure_table(f"{admin}/inference")  # the table's owner makes it, then grants
    with sa.create_engine(f"{admin}/inference", isolation_level="AUTOCOMMIT").connect() as conn:
        for stmt in PG_GRANTS_SQL.strip().splitlines():
            conn.execute(sa.text(stmt))

    writer = f"postgresql+psycopg://vae_recorder@127.0.0.1:{port}/inference"  # the password from the environment
    reader = f"postgresql+psycopg://vae_monitor@127.0.0.1:{port}/inference"
    monkeypatch.setenv(inference_log.ENV_PASSWORD, "rec-pw")
    monkeypatch.setenv(inference_log.ENV_READER_PASSWORD, "mon-pw")
    rec = Recorder(writer, log_inputs=True, flush_s=FLUSH_S)
    rec.record(vae, _images(5), model_name="vae-mnist", version="2")
    assert rec.flush() and rec.written == 5 and rec.dropped == 0, "the insert-only role could not insert"
    rec.close()

    df = inference_log.read_since(reader, after_id=0)
    assert df["id"].tolist() == [1, 2, 3, 4, 5] and set(df["version"]) == {"2"}
    np.testing.assert_array_equal(inference_log.images(df), np.rint(_images(5) * 255).astype(np.uint8))
    monkeypatch.setenv(inference_log.ENV_READER_PASSWORD, "rec-pw")
    with pytest.raises(InferenceLogError, match="permission denied") as err:  # the writer's role cannot read
        inference_log.read_since(f"postgresql+psycopg://vae_recorder@127.0.0.1:{port}/inference")
    assert "rec-pw" not in str(err.value)  # the error names the URL without its password
    monkeypatch.setenv(inference_log.ENV_READER_PASSWORD, "mon-pw")
    engine = inference_log.make_engine(reader, inference_log.ENV_READER_PASSWORD)
    with pytest.raises(sa.exc.ProgrammingError, match="permission denied"):  # the monitor's role cannot write
        with engine.begin() as conn:
            conn.execute(inference_log.TABLE.insert(), [{"served_at": 1.0, "elbo": 0.0, "latent_dim": 1, "mu": b"\0" * 4}])
    engine.dispose()
