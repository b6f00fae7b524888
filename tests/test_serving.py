"""Serving the champion: MLflow's own scoring server, bad input answered 4xx, and a model that follows the alias."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import requests
import torch
from mlflow.exceptions import MlflowException

from tests.support.e2e import tool_env
from tests.support.mlflow_store import fresh_store, free_port
from tests.support.planted import plant_code, plant_pickle
from tests.support.project import ROOT
from tests.support.servers import wait_until_answers
from vae_mlops import model_store, pyfunc, registry, tracking
from vae_mlops.model import VAE, VAEConfig, elbo
from vae_mlops.params import RegisterParams

NAME = "served"
METRIC = "test.nll_iwae"
SWITCH_LIMIT_S = 60.0  # the bound on following the champion
POLL_S = 2  # the test's poll period (the Makefile's default is 10 s; both are well inside the bound)
ROW = [0.5] * 784


def _vae(seed: int) -> VAE:
    torch.manual_seed(seed)
    return VAE(VAEConfig(784, 16, 3, "bernoulli")).eval()


def _candidate(value: float, seed: int) -> registry.Candidate:
    return registry.Candidate(
        model=_vae(seed),
        metrics={METRIC: value},
        dataset="tiny",
        data_hash="hash-1",
        git_commit="0123456789abcdef",
        model_sha256=f"sha-{seed}",
        input_example=np.random.default_rng(0).random((2, 784), dtype=np.float32),
    )


def _expected(vae: VAE, x: np.ndarray) -> dict[str, np.ndarray]:
    xt = torch.from_numpy(x)
    with torch.no_grad():
        mu, log_std = vae.encode(xt)
        return {
            "reconstruction": vae.decode(mu).numpy(),
            "mu": mu.numpy(),
            "log_std": log_std.numpy(),
            "elbo": elbo(vae, xt, eps=pyfunc.elbo_noise(vae.config.latent_dim)).numpy(),
        }


# ---------------------------------------------------------------- input checks, in process


@pytest.mark.parametrize(
    "batch, problem",
    [
        (np.full((1, 3), 0.5), "each row must hold 784 values"),
        (np.array([[np.nan] + ROW[1:]]), "NaN or inf"),
        (np.array([ROW[:-1] + [np.inf]]), "NaN or inf"),
        (np.array([[1.5] + ROW[1:]]), "must lie in [0, 1]"),
        (np.array([[-0.1] + ROW[1:]]), "must lie in [0, 1]"),
        (np.array([["a"] * 784]), "found strings"),
        (np.array([ROW[:-1] + [None]], dtype=object), "found nulls, strings or nested lists"),
        (np.zeros((0, 784)), "empty batch"),
        ([], "empty batch"),
        (np.full((pyfunc.MAX_ROWS + 1, 784), 0.5), f"the limit is {pyfunc.MAX_ROWS}"),
    ],
)
def test_each_bad_batch_is_refused_with_a_message_naming_the_problem(batch, problem):
    with pytest.raises(MlflowException) as info:
        pyfunc.check_images(batch)
    assert problem in info.value.message and info.value.get_http_status_code() == 400


def test_an_unknown_output_is_refused_and_the_default_is_reconstruction():
    assert pyfunc.check_output(None) == pyfunc.check_output({}) == "reconstruction"
    with pytest.raises(MlflowException, match="unknown output 'nope': use one of reconstruction, mu"):
        pyfunc.check_output({"output": "nope"})


def test_an_image_gets_the_same_elbo_alone_and_in_any_batch():
    vae = _vae(4)
    x = np.random.default_rng(3).random((5, 784), dtype=np.float32)
    batch = pyfunc.compute(vae, x, "elbo")
    alone = [pyfunc.compute(vae, x[i : i + 1], "elbo")[0] for i in range(5)]
    reordered = pyfunc.compute(vae, x[::-1].copy(), "elbo")[::-1]
    np.testing.assert_allclose(alone, batch, rtol=1e-5)
    np.testing.assert_allclose(reordered, batch, rtol=1e-5)
    assert len(set(np.round(batch, 3))) == 5  # one score per image, not one for all


def test_a_good_batch_passes_as_float32():
    x = pyfunc.check_images([ROW, ROW])
    assert x.shape == (2, 784) and x.dtype == np.float32


# ---------------------------------------------------------------- the real scoring server


@dataclass
class Served:
    url: str
    uri: str
    run: tracking.PipelineRun
    models: dict[str, VAE] = field(default_factory=dict)  # registry version -> the VAE it holds
    log: Path | None = None
    root: Path | None = None  # the checkout `serve-model` ran for: its `.serving/` and `.inference/`

    def invoke(self, rows, output: str | None = None, timeout: float = 30) -> requests.Response:
        body: dict = {"inputs": rows}
        if output is not None:
            body["params"] = {"output": output}
        return requests.post(f"{self.url}/invocations", json=body, timeout=timeout)


def _start(cmd: list[str], env: dict, log_file: Path, cwd: Path) -> subprocess.Popen:
    with open(log_file, "ab") as log:
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=log, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    """The scoring server and its uvicorn worker: their own process group."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    """`python -m vae_mlops serve-model` (the Makefile's command) over a sqlite store holding v1."""
    folder = tmp_path_factory.mktemp("serving")
    uri = fresh_store(folder)
    client = tracking.mlflow_client(uri)
    run = tracking.PipelineRun(client.create_run(tracking.ensure_experiment(client, "serving", uri)).info.run_id, "1", uri)
    first = _candidate(100.0, seed=0)
    decision = registry.register(run, first, RegisterParams(NAME, METRIC, 0.0), folder / "log.jsonl", _no_rescore)
    assert (decision.version, decision.alias) == ("1", "champion")

    port = free_port()
    env = tool_env(MLFLOW_TRACKING_URI=uri)
    cmd = [sys.executable, "-m", "vae_mlops", "serve-model", "--root", str(folder), "--model", NAME,
           "--port", str(port), "--poll-s", str(POLL_S)]  # fmt: skip
    proc = _start(cmd, env, folder / "serve.log", cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_answers(f"{url}/ping", proc, folder / "serve.log", timeout_s=240)
        yield Served(url, uri, run, {"1": first.model}, folder / "serve.log", folder)
    finally:
        _stop(proc)


def _no_rescore(vae) -> float:
    raise AssertionError("no re-scoring expected")


@pytest.mark.slow
def test_the_server_answers_every_output_from_the_champion_and_names_its_version(served):
    assert requests.get(f"{served.url}/ping", timeout=5).status_code == 200
    assert requests.get(f"{served.url}/version", timeout=5).text.strip()
    x = np.random.default_rng(1).random((3, 784), dtype=np.float32)
    want = _expected(served.models["1"], x)
    for output in (None, *pyfunc.OUTPUTS):
        resp = served.invoke(x.tolist(), output)
        assert resp.status_code == 200, resp.text
        got = resp.json()["predictions"]
        name = output or "reconstruction"
        assert (got["output"], got["model_name"], got["version"]) == (name, NAME, "1")
        assert got["model_id"] and got["model_id"].startswith("m-")
        np.testing.assert_allclose(np.array(got["values"]), want[name], rtol=1e-4, atol=1e-4)
    assert np.array(served.invoke(x.tolist(), "elbo").json()["predictions"]["values"]).shape == (3,)


BAD_REQUESTS = {
    "a row not 784 wide": ({"inputs": [[0.5] * 3]}, "each row must hold 784 values"),
    "NaN": ('{"inputs": [[NaN' + ", 0.5" * 783 + "]]}", "NaN or inf"),
    "inf": ('{"inputs": [[Infinity' + ", 0.5" * 783 + "]]}", "NaN or inf"),
    "a value above 1": ({"inputs": [[255.0] + ROW[1:]]}, "must lie in [0, 1]"),
    "a negative value": ({"inputs": [[-1.0] + ROW[1:]]}, "must lie in [0, 1]"),
    "strings": ({"inputs": [["white"] * 784]}, "found strings"),
    "a null": ({"inputs": [ROW[:-1] + [None]]}, "found nulls"),
    "an empty batch": ({"inputs": []}, "empty batch"),
    "too many rows": ({"inputs": [ROW] * (pyfunc.MAX_ROWS + 1)}, f"the limit is {pyfunc.MAX_ROWS}"),
    "an unknown output": ({"inputs": [ROW], "params": {"output": "sample"}}, "unknown output 'sample'"),
    "ragged rows": ({"inputs": [ROW, ROW[:5]]}, "inhomogeneous"),
    "not JSON": ("pixels please", "valid JSON"),
    "nested too deeply": ('{"inputs": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
    "base64 of the wrong length": ({"inputs": ["AAAA"]}, "1048 characters; got 4"),
    "bad base64": ({"inputs": ["!" * 1046 + "=="]}, "not valid base64"),
}


@pytest.mark.slow
@pytest.mark.parametrize("what", list(BAD_REQUESTS))
def test_bad_input_gets_400_naming_the_problem_and_the_server_keeps_answering(served, what):
    body, problem = BAD_REQUESTS[what]
    data = body if isinstance(body, str) else json.dumps(body)
    headers = {"Content-Type": "application/json"}
    resp = requests.post(f"{served.url}/invocations", data=data, headers=headers, timeout=30)
    assert resp.status_code == 400, (what, resp.status_code, resp.text[-500:])
    assert problem in resp.json()["message"], (what, resp.text[-500:])
    good = served.invoke([ROW])
    assert good.status_code == 200 and len(good.json()["predictions"]["values"]) == 1


@pytest.mark.slow
def test_a_body_without_content_type_gets_400_naming_the_header(served):
    resp = requests.post(f"{served.url}/invocations", data=json.dumps({"inputs": [ROW]}), timeout=30,
                         headers={"Content-Type": ""})  # fmt: skip
    assert resp.status_code == 400 and "Content-Type" in resp.json()["message"], resp.text[-300:]


@pytest.mark.slow
def test_base64_images_get_the_same_answers_as_their_float_rows(served):
    images = np.random.default_rng(5).integers(0, 256, (6, 784), dtype=np.uint8)
    floats = served.invoke((images / np.float32(255)).astype(np.float32).tolist(), "elbo").json()["predictions"]
    as_list = served.invoke(pyfunc.encode_images(images), "elbo").json()["predictions"]
    column = requests.post(f"{served.url}/invocations", timeout=30, json={
        "dataframe_split": {"columns": ["image"], "data": [[s] for s in pyfunc.encode_images(images)]},
        "params": {"output": "elbo"}}).json()["predictions"]  # fmt: skip
    np.testing.assert_allclose(as_list["values"], floats["values"], rtol=1e-5)
    np.testing.assert_allclose(column["values"], floats["values"], rtol=1e-5)


@pytest.mark.slow
def test_the_server_records_each_answered_image_and_never_a_refused_one(served):
    from vae_mlops import inference_log

    url = inference_log.default_url(served.root)
    last = -1
    while last != (last := _last_id(url)):  # earlier tests' rows are committed within a second
        time.sleep(1.5)
    images = np.random.default_rng(9).integers(0, 256, (5, 784), dtype=np.uint8)
    assert served.invoke(pyfunc.encode_images(images), "mu").status_code == 200
    assert served.invoke([[0.5] * 3]).status_code == 400  # refused: not recorded
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(rows := inference_log.read_since(url, after_id=last)) < 5:
        time.sleep(0.2)
    assert len(rows) == 5, rows
    np.testing.assert_array_equal(inference_log.images(rows), images)
    assert set(rows["version"]) == {served.invoke([ROW]).json()["predictions"]["version"]}
    want = _expected(served.models[rows["version"].iloc[0]], images / np.float32(255))
    np.testing.assert_allclose(rows["elbo"].to_numpy(), want["elbo"], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(inference_log.latent_means(rows), want["mu"], rtol=1e-4, atol=1e-4)


def _last_id(url: str) -> int:
    from vae_mlops import inference_log

    rows = inference_log.read_since(url)
    return int(rows["id"].max()) if len(rows) else 0


@dataclass
class Traffic:
    """Requests sent back to back from a thread: each answer's version and every failure."""

    served: Served
    x: list
    versions: list[tuple[float, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                resp = self.served.invoke(self.x, "mu", timeout=30)
                if resp.status_code == 200:
                    self.versions.append((time.monotonic(), resp.json()["predictions"]["version"]))
                else:
                    self.failures.append(f"HTTP {resp.status_code}: {resp.text[-300:]}")
            except requests.RequestException as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
            time.sleep(0.02)


@pytest.mark.slow
def test_a_new_champion_is_served_within_60s_with_no_failed_request(served, tmp_path):
    x = np.random.default_rng(2).random((4, 784), dtype=np.float32)
    traffic = Traffic(served, x.tolist())
    sender = threading.Thread(target=traffic.run, daemon=True)
    sender.start()
    try:
        time.sleep(1.0)
        better = _candidate(50.0, seed=7)
        moved = time.monotonic()  # the alias moves during `register`: the time counts from before it
        decision = registry.register(served.run, better, RegisterParams(NAME, METRIC, 0.0), tmp_path / "log.jsonl",
                                     _no_rescore)  # fmt: skip
        assert (decision.version, decision.alias) == ("2", "champion")
        while time.monotonic() - moved < SWITCH_LIMIT_S and not any(v == "2" for _, v in traffic.versions):
            time.sleep(0.2)
        time.sleep(1.0)  # a few answers after the switch
    finally:
        traffic.stop.set()
        sender.join(timeout=40)
    switched = [t for t, v in traffic.versions if v == "2"]
    assert switched, f"still serving {traffic.versions[-1:]} {SWITCH_LIMIT_S}s after the alias moved"
    after = [v for t, v in traffic.versions if t > switched[0]]
    counts = Counter(v for _, v in traffic.versions)
    print(f"switch after {switched[0] - moved:.1f}s; answers per version {dict(counts)}; failed: {traffic.failures}")
    assert switched[0] - moved <= SWITCH_LIMIT_S
    assert set(after) == {"2"}  # never back to the old weights
    assert traffic.failures == []
    resp = served.invoke(x.tolist(), "mu").json()["predictions"]
    np.testing.assert_allclose(np.array(resp["values"]), _expected(better.model, x)["mu"], rtol=1e-4, atol=1e-4)
    assert "now serving served v2" in served.log.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("plant", ["pickle", "own-loader"])
def test_a_planted_champion_is_refused_and_the_last_good_one_keeps_serving(served, tmp_path, plant):
    marker = tmp_path / "pwned"
    before = served.invoke([ROW]).json()["predictions"]["version"]
    reg = tracking.ModelRegistry(NAME, served.uri)
    if plant == "pickle":
        planted = reg.create_version(plant_pickle(served.run, marker), served.run.run_id, {})
    else:  # a genuine version, tampered with before it becomes champion
        uri = model_store.log_vae(served.run, _vae(11), np.zeros((1, 784), np.float32), {})
        planted = reg.create_version(uri, served.run.run_id, {})
        plant_code(f"models:/{NAME}/{planted.version}", served.uri, marker, plant)
    log_before = served.log.read_text()
    reg.set_alias(registry.CHAMPION, planted.version)
    deadline = time.monotonic() + SWITCH_LIMIT_S
    while time.monotonic() < deadline and served.log.read_text().count("UnsafeModelError") <= log_before.count(
        "UnsafeModelError"
    ):
        time.sleep(0.5)
    assert f"still serving v{before}: UnsafeModelError" in served.log.read_text()[len(log_before) :]
    answer = served.invoke([ROW])
    assert answer.status_code == 200 and answer.json()["predictions"]["version"] == before
    assert not marker.exists()
    reg.set_alias(registry.CHAMPION, before)  # the next test starts from a good champion


def test_the_makefile_serves_the_verified_champion_on_its_own_port():
    out = subprocess.run(["make", "-n", "serve-model"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "python -m vae_mlops serve-model --model vae-mnist --port 5080 --poll-s 10" in out
    other = subprocess.run(["make", "-n", "serve-model", "MODEL_PORT=5999"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout  # fmt: skip
    assert "--port 5999" in other


def test_the_scoring_server_gets_the_read_only_account_and_no_other_secret():
    from vae_mlops import serving

    env = serving.server_env({
        "MLFLOW_TRACKING_USERNAME": "pipeline", "MLFLOW_TRACKING_PASSWORD": "writer-secret",
        "VAE_SERVE_MLFLOW_USERNAME": "reader", "VAE_SERVE_MLFLOW_PASSWORD": "reader-secret",
        "PREFECT_API_AUTH_STRING": "admin:prefect", "VAE_MLFLOW_ADMIN_PASSWORD": "admin-secret",
        "PGPASSWORD": "db", "VAE_INFERENCE_DB_PASSWORD": "insert-only", "PATH": "/usr/bin",
    })  # fmt: skip
    assert env["MLFLOW_TRACKING_USERNAME"] == "reader" and env["MLFLOW_TRACKING_PASSWORD"] == "reader-secret"
    assert env["VAE_INFERENCE_DB_PASSWORD"] == "insert-only" and env["PATH"] == "/usr/bin"
    leaked = [v for v in ("writer-secret", "admin:prefect", "admin-secret", "db") if v in env.values()]
    assert leaked == []
