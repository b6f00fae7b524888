"""`make bench-serve`: MLflow's scoring server on loopback against in-process pyfunc predict, same model, same run.

A VAE of params.yaml's architecture (random weights: inference costs the same) is
logged in the weights-only format into a temporary sqlite store, made champion and
served exactly as `make serve-model` does (`mlflow models serve --env-manager local`,
following the alias). One client on one keep-alive connection sends `--requests`
requests of 1 image and as many of 256 images, each body encoded once beforehand;
the same batches go through `mlflow.pyfunc.load_model(...).predict` in this process.
Both sides run torch on `--threads` threads (default 1: on a shared machine two
OpenMP threads stall whenever a neighbour holds a core).
The two modes take turns in blocks of 100 requests, so another process's burst on a
shared machine slows both alike. Latency is per request (send to last byte read);
images/s is images over the summed request times. The ratio HTTP / in-process is the
serving overhead: JSON both ways, MLflow's input parsing, uvicorn, loopback TCP.

Prints a Markdown table and writes reports/serve_load.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

BLOCK = 100  # requests per turn
BATCHES = (1, 256)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _champion(folder: Path, params_file: Path) -> str:
    """A sqlite store in `folder` whose model `bench` has a champion; returns the tracking URI."""
    import torch
    import yaml
    from mlflow import MlflowClient

    from vae_mlops import model_store, tracking
    from vae_mlops.model import VAE, VAEConfig

    model = yaml.safe_load(params_file.read_text())["model"]
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run_id = client.create_run(tracking._experiment_id(client, "serve-load", uri)).info.run_id
    torch.manual_seed(0)
    vae = VAE(VAEConfig(784, model["hidden_dim"], model["latent_dim"], model["likelihood"])).eval()
    example = np.random.default_rng(0).random((2, 784), dtype=np.float32)
    model_uri = model_store.log_vae(tracking.PipelineRun(run_id, "0", uri, client), vae, example, {})
    reg = tracking.ModelRegistry("bench", uri)
    reg.set_alias("champion", reg.create_version(model_uri, run_id, {}).version)
    return uri


def _serve(uri: str, port: int, log_file: Path, threads: int) -> subprocess.Popen:
    """`make serve-model`'s command, on `port`, with `threads` torch threads."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # uvicorn, beside this Python
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false",
               VAE_SERVE_FOLLOW="bench@champion", PATH=path)  # fmt: skip
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = ["mlflow", "models", "serve", "-m", "models:/bench@champion", "--env-manager", "local",
           "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    with open(log_file, "ab") as log:
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=log, start_new_session=True)


def _wait(url: str, proc: subprocess.Popen, log_file: Path, timeout_s: float = 300) -> None:
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the scoring server exited: {log_file.read_text()[-2000:]}")
        try:
            if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the scoring server did not answer in {timeout_s:.0f}s")


def _summary(times: list[float], images: int, failed: int) -> dict:
    ms = sorted(t * 1000 for t in times)
    return {
        "requests": len(times),
        "failed": failed,
        "p50_ms": statistics.median(ms),
        "p99_ms": ms[min(len(ms) - 1, int(round(0.99 * (len(ms) - 1))))],
        "images_per_s": images * len(times) / sum(times),
    }


def measure(url: str, model, x: np.ndarray, n: int, output: str, deadline: float) -> dict[str, dict]:
    """n requests of `x` over HTTP and n in-process predicts, in alternating blocks; fewer if `deadline` passes."""
    import requests

    body = json.dumps({"inputs": x.tolist(), "params": {"output": output}}).encode()
    headers = {"Content-Type": "application/json"}
    http, local, failed = [], [], 0
    with requests.Session() as session:
        for _ in range(5):  # warm-up: connection, first-call costs
            session.post(url, data=body, headers=headers, timeout=60).content
            model.predict(x, params={"output": output})
        while len(http) < n and time.monotonic() < deadline:
            for _ in range(min(BLOCK, n - len(http))):
                t0 = time.perf_counter()
                resp = session.post(url, data=body, headers=headers, timeout=60)
                resp.content
                http.append(time.perf_counter() - t0)
                failed += resp.status_code != 200
            for _ in range(len(http) - len(local)):
                t0 = time.perf_counter()
                model.predict(x, params={"output": output})
                local.append(time.perf_counter() - t0)
            print(f"  {len(x)} image(s): {len(http)}/{n} requests", file=sys.stderr, flush=True)
    return {"http": _summary(http, len(x), failed), "in_process": _summary(local, len(x), 0)}


def table(results: dict) -> str:
    lines = [
        "| images / request | mode | requests | failed | p50 ms | p99 ms | images/s | p50 HTTP ÷ in-process |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for batch, modes in results.items():
        ratio = modes["http"]["p50_ms"] / modes["in_process"]["p50_ms"]
        for mode, label in (("http", "HTTP `/invocations`"), ("in_process", "in-process `predict`")):
            r = modes[mode]
            lines.append(
                f"| {batch} | {label} | {r['requests']} | {r['failed']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
                f"| {r['images_per_s']:,.0f} | {f'{ratio:.1f}×' if mode == 'http' else ''} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve_load", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per batch size and mode (default 2000)")
    parser.add_argument("--output", default="elbo", help="the model's `output` param (default elbo: the novelty score)")
    parser.add_argument("--max-minutes", type=float, default=45.0,
                        help="stop sending (and say how many were sent) once the run has taken this long")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="architecture from this file")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in the server and in this process (default 1; 0: torch's default)")
    parser.add_argument("--out", type=Path, default=Path("reports/serve_load.json"))
    args = parser.parse_args(argv)

    import mlflow
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from vae_mlops import atomic
    from vae_mlops.tracking import use_store

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        folder = Path(tmp)
        uri = _champion(folder, args.params)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        proc = _serve(uri, port, folder / "serve.log", args.threads)
        try:
            _wait(url, proc, folder / "serve.log")
            with use_store(uri):
                model = mlflow.pyfunc.load_model("models:/bench@champion")
            rng = np.random.default_rng(0)
            deadline = time.monotonic() + 60 * args.max_minutes
            results = {}
            for batch in BATCHES:
                x = rng.random((batch, 784), dtype=np.float32)
                results[batch] = measure(f"{url}/invocations", model, x, args.requests, args.output, deadline)
                print(f"{batch} image(s) per request: done", file=sys.stderr, flush=True)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
    report = {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "output": args.output,
        "requests_asked": args.requests,
        "threads": args.threads or torch.get_num_threads(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_avg_before": load_before, "load_avg_after": os.getloadavg()},  # fmt: skip
        "results": {str(k): v for k, v in results.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(args.out, report)
    print(f"output={args.output}, {report['threads']} torch thread(s) each side, one client, keep-alive")
    print(table(results))
    print(f"\nload average before {load_before[0]:.2f}, after {report['machine']['load_avg_after'][0]:.2f}; {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
