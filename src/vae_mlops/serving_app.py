"""The scoring server's ASGI app: MLflow's own (`/ping`, `/version`, `/invocations`) behind a body guard.

`uvicorn vae_mlops.serving_app:app` with `VAE_SERVE_MODEL_DIR` naming a local folder that
`model_store.materialise` wrote. MLflow's app answers a request with no Content-Type, or
JSON nested deeper than Python's parser allows, with a bare 500; the guard answers both
with 400 and a message, before MLflow reads the body. Everything else is MLflow's.
"""

from __future__ import annotations

import json
import os
from typing import Any, Awaitable, Callable

import numpy as np

from vae_mlops.tracking import mlflow_internals

ENV_MODEL_DIR = "VAE_SERVE_MODEL_DIR"
MAX_DEPTH = 64  # a batch is 3 levels deep ({"inputs": [[...]]}); far below the parser's recursion limit
MAX_BODY_BYTES = 64 * 1024**2  # 1,024 rows of floats are about 4 MB of JSON

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


def nesting_depth(body: bytes) -> int:
    """Deepest bracket nesting, counting brackets inside strings too (an upper bound, vectorised)."""
    raw = np.frombuffer(body, dtype=np.uint8)
    steps = np.isin(raw, (ord("["), ord("{"))).astype(np.int32) - np.isin(raw, (ord("]"), ord("}")))
    return int(np.cumsum(steps).max(initial=0))


def body_problem(headers: dict[bytes, bytes], body: bytes) -> str | None:
    """Why MLflow's app would fail on this request with a 500, or None."""
    content_type = headers.get(b"content-type", b"").decode("latin-1").strip()
    if not content_type:
        return "no Content-Type header: send the body as application/json (or text/csv)"
    if content_type.split(";")[0].strip() == "application/json" and nesting_depth(body) > MAX_DEPTH:
        try:
            json.loads(body)
        except RecursionError:
            return "the JSON is nested too deeply (a batch is {\"inputs\": [[784 values], ...]})"
        except ValueError:
            return None  # MLflow answers invalid JSON with its own 400
    return None


class BodyGuard:
    """Pure ASGI middleware: reads a POST /invocations body once, refuses what MLflow would 500 on, replays it."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/invocations":
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > MAX_BODY_BYTES:
                return await _answer(send, 413, f"the body is over {MAX_BODY_BYTES} bytes; split the batch")
        body = b"".join(chunks)
        problem = body_problem(dict(scope.get("headers", [])), body)
        if problem:
            return await _answer(send, 400, problem)
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


async def _answer(send: Send, status: int, message: str) -> None:
    """MLflow's error shape: {"error_code": ..., "message": ...}."""
    code = "BAD_REQUEST" if status == 400 else "REQUEST_LIMIT_EXCEEDED"
    payload = json.dumps({"error_code": code, "message": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def build_app(model_dir: str):
    """MLflow's scoring app on the local folder `model_dir`, guarded."""
    return BodyGuard(mlflow_internals.scoring_app(model_dir))


def __getattr__(name: str):
    """`uvicorn vae_mlops.serving_app:app` builds the app on first access, not at import."""
    if name == "app":
        globals()["app"] = build_app(os.environ[ENV_MODEL_DIR])
        return globals()["app"]
    raise AttributeError(name)
