"""`make bench-serve`: the scoring server on loopback, floats against base64 images, recording on and off.

A VAE of params.yaml's architecture (random weights: inference costs the same) is
logged into a temporary sqlite store, made champion and served twice exactly as
`make serve-model` does (`python -m vae_mlops serve-model`): once recording every
answered image (the default), once with `VAE_INFERENCE_LOG=off`. One client on one
keep-alive connection per server sends `--requests` requests of 1 image and as many
of 256 images, in two encodings: JSON rows of 784 floats, and one base64 string of
784 bytes per image; each body is encoded once beforehand. The same batches go
through the safe in-process loader (`model_store.load_pyfunc(...).predict`).
Both sides run torch on `--threads` threads (default 1). The variants take turns
in blocks of `BLOCK` requests, so another process's burst slows them alike.
Latency is per request (send to last byte read); images/s is images over the
summed request times.

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
import requests
import torch
import yaml
from mlflow import MlflowClient

from vae_mlops import atomic, model_store, tracking
from vae_mlops.model import VAE, VAEConfig
from vae_mlops.pyfunc import encode_images

BLOCK = 50  # requests per turn
BATCHES = (1, 256)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _champion(folder: Path, params_file: Path) -> str:
    """A sqlite store in `folder` whose model `bench` has a champion; returns the tracking URI."""


    model = yaml.safe_load(params_file.read_text())["model"]
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run_id = client.create_run(tracking.ensure_experiment(client, "serve-load", uri)).info.run_id
    torch.manual_seed(0)
    vae = VAE(VAEConfig(784, model["hidden_dim"], model["latent_dim"], model["likelihood"])).eval()
    example = np.random.default_rng(0).random((2, 784), dtype=np.float32)
    model_uri = model_store.log_vae(tracking.PipelineRun(run_id, "0", uri, client), vae, example, {})
    reg = tracking.ModelRegistry("bench", uri)
    reg.set_alias("champion", reg.create_version(model_uri, run_id, {}).version)
    return uri


def _serve(uri: str, root: Path, port: int, log_file: Path, threads: int, record: bool) -> subprocess.Popen:
    """`make serve-model`'s command, on `port`, with `threads` torch threads; recording on or off."""
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, VAE_INFERENCE_LOG="on" if record else "off")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "vae_mlops", "serve-model", "--root", str(root), "--model", "bench",
           "--port", str(port)]  # fmt: skip
    with open(log_file, "ab") as log:
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=log, start_new_session=True)


def _wait(url: str, proc: subprocess.Popen, log_file: Path, timeout_s: float = 300) -> None:

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


def bodies(x: np.ndarray, output: str) -> dict[str, tuple[bytes, object]]:
    """encoding -> (the HTTP body, the in-process input) for the same images."""

    images = np.round(x * 255).astype(np.uint8)
    floats = images.astype(np.float32) / np.float32(255)
    strings = encode_images(images)
    return {
        "floats": (json.dumps({"inputs": floats.tolist(), "params": {"output": output}}).encode(), floats),
        "base64": (json.dumps({"inputs": strings, "params": {"output": output}}).encode(), np.array(strings)),
    }


def measure(urls: dict[str, str], model, x: np.ndarray, n: int, output: str, deadline: float) -> dict[str, dict]:
    """n requests per (server, encoding) and n in-process predicts per encoding, in turns; fewer past `deadline`."""

    headers = {"Content-Type": "application/json"}
    encoded = bodies(x, output)
    times: dict[str, list[float]] = {}
    failed: dict[str, int] = {}
    sessions = {name: requests.Session() for name in urls}
    for name, url in urls.items():
        for body, _ in encoded.values():
            for _ in range(5):  # warm-up: connection, first-call costs
                sessions[name].post(url, data=body, headers=headers, timeout=60).content
    for _, local in encoded.values():
        model.predict(local, params={"output": output})
    done = 0
    while done < n and time.monotonic() < deadline:
        block = min(BLOCK, n - done)
        for name, url in urls.items():
            for encoding, (body, _) in encoded.items():
                key = f"http {encoding}, recording {name}"
                for _ in range(block):
                    t0 = time.perf_counter()
                    resp = sessions[name].post(url, data=body, headers=headers, timeout=60)
                    resp.content
                    times.setdefault(key, []).append(time.perf_counter() - t0)
                    failed[key] = failed.get(key, 0) + (resp.status_code != 200)
        for encoding, (_, local) in encoded.items():
            for _ in range(block):
                t0 = time.perf_counter()
                model.predict(local, params={"output": output})
                times.setdefault(f"in-process {encoding}", []).append(time.perf_counter() - t0)
        done += block
        print(f"  {len(x)} image(s): {done}/{n} requests per variant", file=sys.stderr, flush=True)
    for session in sessions.values():
        session.close()
    return {key: _summary(t, len(x), failed.get(key, 0)) for key, t in times.items()}


def table(results: dict) -> str:
    lines = [
        "| images / request | variant | requests | failed | p50 ms | p99 ms | images/s |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for batch, variants in results.items():
        for name, r in variants.items():
            lines.append(
                f"| {batch} | {name} | {r['requests']} | {r['failed']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
                f"| {r['images_per_s']:,.0f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve_load", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="requests per batch size and variant (default 200)")
    parser.add_argument("--output", default="elbo", help="the model's `output` param (default elbo: the novelty score)")
    parser.add_argument("--max-minutes", type=float, default=45.0,
                        help="stop sending (and say how many were sent) once the run has taken this long")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="architecture from this file")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in the server and in this process (default 1; 0: torch's default)")
    parser.add_argument("--out", type=Path, default=Path("reports/serve_load.json"))
    args = parser.parse_args(argv)


    if args.threads:
        torch.set_num_threads(args.threads)


    load_before = os.getloadavg()
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        folder = Path(tmp)
        uri = _champion(folder, args.params)
        urls = {}
        try:
            for name, record in (("on", True), ("off", False)):
                port = _free_port()
                log_file = folder / f"serve-{name}.log"
                (folder / name).mkdir()
                procs.append(_serve(uri, folder / name, port, log_file, args.threads, record))
                _wait(f"http://127.0.0.1:{port}", procs[-1], log_file)
                urls[name] = f"http://127.0.0.1:{port}/invocations"
            model = model_store.load_pyfunc("models:/bench@champion", uri)
            rng = np.random.default_rng(0)
            deadline = time.monotonic() + 60 * args.max_minutes
            results = {}
            for batch in BATCHES:
                x = rng.random((batch, 784), dtype=np.float32)
                results[batch] = measure(urls, model, x, args.requests, args.output, deadline)
                print(f"{batch} image(s) per request: done", file=sys.stderr, flush=True)
        finally:
            for proc in procs:
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
    print(f"output={args.output}, {report['threads']} torch thread(s) each side, one client per server, keep-alive")
    print(table(results))
    print(f"\nload average before {load_before[0]:.2f}, after {report['machine']['load_avg_after'][0]:.2f}; {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
