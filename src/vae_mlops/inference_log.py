"""The inference table: one row per image the scoring server answered, written off the request path.

    rec = Recorder.from_env()                                   # in the model's load_context
    rec.record(vae, x, model_name="vae-mnist", version="3")     # in predict(), after the input was accepted
    df = read_since(reader_url(), after_id=0)                   # the monitor, the snapshots: validated rows

One table and one code path (SQLAlchemy Core) for an embedded SQLite file
(default: `<root>/.inference/inference.db`) and PostgreSQL (`VAE_INFERENCE_DB_URI`,
an insert-only role under `make services`). A row holds the time, the registry
version that answered, the image's ELBO with the fixed noise and its latent mean
(`scores.served_scores`, the numbers `output=elbo` and `output=mu` answer), and
the image itself as 784 bytes unless `serve.log_inputs` is false.

`record()` only enqueues: one daemon thread scores the images and inserts them,
committing at least every `serve.flush_s`. So a SIGKILL loses at most the rows
recorded in the last `flush_s` plus one commit (under a second with the default
0.5 s; tests/test_inference_log.py kills a real process to hold that bound), and
SIGTERM, Ctrl-C or a normal exit lose nothing: atexit, and a SIGTERM handler
where none was set, flush the queue before the process ends. A database that
fails costs the rows of that commit (counted in `dropped`, said once), never a
request.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import signal
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pandera.pandas as pa
import sqlalchemy as sa
import torch

from vae_mlops.errors import VaeMlopsError
from vae_mlops.params import ServeParams, load_params
from vae_mlops.scores import as_unit_float, served_scores

TABLE_NAME = "inference_log"
INPUT_DIM = 784
ENV_URL = "VAE_INFERENCE_DB_URI"  # the writer's SQLAlchemy URL (an insert-only role on PostgreSQL)
ENV_PASSWORD = "VAE_INFERENCE_DB_PASSWORD"  # put into the writer's URL, so the URL itself holds no secret
ENV_READER_URL = "VAE_MONITOR_DB_URI"  # the readers' URL (a select-only role); default: the writer's
ENV_READER_PASSWORD = "VAE_MONITOR_DB_PASSWORD"
ENV_ENABLED = "VAE_INFERENCE_LOG"  # "off": the server records nothing (the benchmark's baseline)
ENV_LOG_INPUTS = "VAE_SERVE_LOG_INPUTS"  # 0/1, over params.yaml's serve.log_inputs
DEFAULT_DIR = ".inference"
DEFAULT_FILE = "inference.db"
MAX_PENDING_IMAGES = 200_000  # queued while the database is slow or down; beyond this, new rows are dropped
CLOSE_TIMEOUT_S = 30.0

log = logging.getLogger(__name__)

METADATA = sa.MetaData()
TABLE = sa.Table(
    TABLE_NAME,
    METADATA,
    # an identity column: on PostgreSQL, INSERT alone may use it (no grant on a sequence);
    # on SQLite an INTEGER PRIMARY KEY with AUTOINCREMENT, so an id is never reused
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), sa.Identity(), primary_key=True),
    sa.Column("served_at", sa.Double(), nullable=False),  # Unix seconds, UTC
    sa.Column("model_name", sa.String(255)),
    sa.Column("version", sa.String(64)),
    sa.Column("elbo", sa.Double(), nullable=False),  # nats, the fixed-noise single-sample ELBO
    sa.Column("latent_dim", sa.Integer(), nullable=False),
    sa.Column("mu", sa.LargeBinary(), nullable=False),  # latent_dim little-endian float32
    sa.Column("image", sa.LargeBinary()),  # 784 uint8, row-major 28x28; NULL when serve.log_inputs is false
    sqlite_autoincrement=True,
)
COLUMNS = tuple(c.name for c in TABLE.columns)


class InferenceLogError(VaeMlopsError):
    """The inference table cannot be opened or read."""


# ---------------------------------------------------------------- where the table is


def default_url(root: Path | None = None) -> str:
    """`sqlite:///<root>/.inference/inference.db`, root defaulting to the working directory."""
    return f"sqlite:///{(root or Path.cwd()).resolve() / DEFAULT_DIR / DEFAULT_FILE}"


def writer_url(root: Path | None = None) -> str:
    return os.environ.get(ENV_URL) or default_url(root)


def reader_url(root: Path | None = None) -> str:
    return os.environ.get(ENV_READER_URL) or writer_url(root)


def safe_url(url: str | sa.URL) -> str:
    """The URL as it may be logged: the password masked."""
    return sa.make_url(url).render_as_string(hide_password=True)


def has_password(url: str) -> bool:
    """Whether `url` carries a password (or is not a URL at all): such a URL is never stored or forwarded."""
    try:
        return sa.make_url(url).password is not None
    except sa.exc.ArgumentError:
        return True


def make_engine(url: str, password_env: str = ENV_PASSWORD) -> sa.Engine:
    """An engine for `url`; SQLite gets its folder, WAL (readers never block the writer) and a busy timeout."""
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError as exc:
        raise InferenceLogError(f"{url!r} is not a database URL ({exc}); set {ENV_URL} to a SQLAlchemy URL") from None
    if os.environ.get(password_env) and parsed.password is None:
        parsed = parsed.set(password=os.environ[password_env])
    if parsed.get_backend_name() != "sqlite":
        return sa.create_engine(parsed, pool_pre_ping=True)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(parsed, connect_args={"timeout": 30})

    @sa.event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")  # a committed row survives the process being killed
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    return engine


def ensure_table(url_or_engine: str | sa.Engine) -> None:
    """Create the table where it is missing (SQLite; `make services` creates it on PostgreSQL as its owner)."""
    engine = make_engine(url_or_engine) if isinstance(url_or_engine, str) else url_or_engine
    try:
        METADATA.create_all(engine, checkfirst=True)
    except sa.exc.SQLAlchemyError as exc:
        raise InferenceLogError(
            f"cannot create or find table {TABLE_NAME} in {safe_url(engine.url)}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:300]}. On PostgreSQL `make services` creates it; check the URL and role."
        ) from None


# ---------------------------------------------------------------- the writer


@dataclass
class _Item:
    served_at: float
    vae: Any
    x: np.ndarray
    model_name: str | None
    version: str | None
    elbo: np.ndarray | None
    mu: np.ndarray | None


_STOP = object()
_LIVE: weakref.WeakSet[Recorder] = weakref.WeakSet()  # what a SIGTERM flushes
_HOOKS_LOCK = threading.Lock()
_HOOKS_INSTALLED = False


class Recorder:
    """Records answered images in the background; `record()` costs the request a queue put."""

    def __init__(self, url: str, *, log_inputs: bool, flush_s: float, max_pending: int = MAX_PENDING_IMAGES) -> None:
        self.url = url
        self.log_inputs = log_inputs
        self.flush_s = flush_s
        self.max_pending = max_pending
        self.engine = make_engine(url)
        ensure_table(self.engine)
        self.recorded = 0  # images accepted by record()
        self.written = 0  # images committed
        self.dropped = 0  # images lost: queue full or a failed commit
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._done = threading.Condition()
        self._wake = threading.Event()
        self._closed = False
        self._problem: str | None = None
        self._thread = threading.Thread(target=self._run, name="vae-inference-log", daemon=True)
        self._thread.start()
        _LIVE.add(self)
        _install_exit_hooks()

    @classmethod
    def from_env(cls, root: Path | None = None) -> Recorder | None:
        """The recorder the scoring server uses: URL from the environment, `serve:` from `<root>/params.yaml`.

        None when `VAE_INFERENCE_LOG=off`. Without a params.yaml in `root` (default: the
        working directory), images and scores are both kept and commits are 0.5 s apart.
        """
        if os.environ.get(ENV_ENABLED, "").strip().lower() in ("off", "0", "false", "no"):
            return None
        root = root or Path.cwd()
        cfg = load_params(root / "params.yaml").serve if (root / "params.yaml").is_file() else ServeParams(True, 0.5)
        log_inputs = cfg.log_inputs
        if os.environ.get(ENV_LOG_INPUTS, "").strip():
            log_inputs = os.environ[ENV_LOG_INPUTS].strip().lower() in ("1", "true", "yes", "on")
        rec = cls(writer_url(root), log_inputs=log_inputs, flush_s=cfg.flush_s)
        what = "images and scores" if log_inputs else "scores only"
        print(f"vae_mlops.inference_log: recording {what} in {safe_url(rec.url)}", file=sys.stderr, flush=True)
        return rec

    def record(
        self,
        vae: Any,
        x: np.ndarray,
        *,
        model_name: str | None,
        version: str | None,
        elbo: np.ndarray | None = None,
        mu: np.ndarray | None = None,
    ) -> None:
        """Queue the answered images `x` ((N, 784) float32 on [0, 1] or uint8); never blocks, never raises.

        The scores are computed in the background with `vae` (the weights that answered),
        unless `elbo` (N,) and `mu` (N, L) are given. `x` must not be changed afterwards.
        """
        n = len(x)
        if self._closed or n == 0:
            return
        with self._done:
            if self.recorded - self.written - self.dropped + n > self.max_pending:
                self.dropped += n
                self._say_once(f"queue full ({self.max_pending} images): dropping rows until the database catches up")
                return
            self.recorded += n
        self._queue.put(_Item(time.time(), vae, x, model_name, version, elbo, mu))

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until everything recorded so far is committed (or dropped); False on timeout."""
        with self._done:
            target = self.recorded
        self._wake.set()
        self._queue.put(None)  # wakes a thread waiting for its first item
        deadline = time.monotonic() + timeout_s
        with self._done:
            while self.written + self.dropped < target:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._done.wait(min(left, 0.1))
        return True

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Flush and stop the thread; later `record()` calls are ignored."""
        if self._closed:
            return
        self.flush(timeout_s)
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout_s)
        self.engine.dispose()
        _LIVE.discard(self)

    # ------------------------------------------------------------ the thread

    def _run(self) -> None:
        last_commit = 0.0
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            items = [] if first is None else [first]
            # gather until flush_s since the last commit, or at once when a flush is asked for
            deadline = last_commit + self.flush_s
            stop = False
            while not self._wake.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    item = self._queue.get(timeout=left)
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                if item is not None:
                    items.append(item)
            self._wake.clear()  # before draining: a flush asked for after this point gets its own pass
            while not stop:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                elif item is not None:
                    items.append(item)
            if items:
                self._write(items)
                last_commit = time.monotonic()
            if stop:
                return

    def _write(self, items: list[_Item]) -> None:
        n = sum(len(it.x) for it in items)
        try:
            rows = self._rows(items)
            with self.engine.begin() as conn:
                conn.execute(TABLE.insert(), rows)
        except Exception as exc:  # the database is down or refuses: lose these rows, never the server
            with self._done:
                self.dropped += n
                self._done.notify_all()
            self._say_once(f"{n} rows not recorded: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
            return
        with self._done:
            self.written += n
            self._done.notify_all()
        if self._problem:
            self._problem = None
            log.warning("inference_log: recording again in %s", safe_url(self.url))

    def _rows(self, items: list[_Item]) -> list[dict[str, Any]]:
        """The table's rows; the images one model answered are scored in one pass."""
        scored: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        by_model: dict[int, list[int]] = {}
        for k, it in enumerate(items):
            if it.elbo is None or it.mu is None:
                by_model.setdefault(id(it.vae), []).append(k)
            else:
                scored[k] = (np.asarray(it.elbo).reshape(-1), np.asarray(it.mu).reshape(len(it.x), -1))
        for ks in by_model.values():
            s = served_scores(items[ks[0]].vae, torch.cat([as_unit_float(items[k].x) for k in ks]))
            bounds = np.cumsum([0] + [len(items[k].x) for k in ks])
            for k, lo, hi in zip(ks, bounds[:-1], bounds[1:]):
                scored[k] = (s.elbo[lo:hi], s.mu[lo:hi])
        rows = []
        for k, it in enumerate(items):
            elbo, mu = scored[k]
            mu = np.ascontiguousarray(mu, dtype="<f4")
            images = to_uint8(it.x) if self.log_inputs else None
            rows += [
                {
                    "served_at": it.served_at,
                    "model_name": it.model_name,
                    "version": it.version,
                    "elbo": float(elbo[i]),
                    "latent_dim": mu.shape[1],
                    "mu": mu[i].tobytes(),
                    "image": None if images is None else images[i].tobytes(),
                }
                for i in range(len(it.x))
            ]
        return rows

    def _say_once(self, problem: str) -> None:
        if problem != self._problem:
            self._problem = problem
            log.error("inference_log (%s): %s", safe_url(self.url), problem)
            print(f"vae_mlops.inference_log: {problem}", file=sys.stderr, flush=True)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """(N, 784) uint8 grey levels from floats on [0, 1] (rounded) or uint8 as they are."""
    x = np.asarray(x).reshape(len(x), -1)
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def close_all() -> None:
    """Flush and stop every live recorder (atexit; the SIGTERM handler)."""
    for rec in list(_LIVE):
        rec.close()


def _on_sigterm(signum: int, _frame: Any) -> None:
    """Flush, then end as SIGTERM would have: the exit status still says 'terminated'."""
    close_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_exit_hooks() -> None:
    """atexit always; a SIGTERM handler only where SIGTERM still has its default action.

    uvicorn (under `mlflow models serve`) takes SIGTERM over for its graceful shutdown,
    then puts back the handler it found and raises the signal again: this one, so the
    queue is flushed on the way out.
    """
    global _HOOKS_INSTALLED
    with _HOOKS_LOCK:
        if _HOOKS_INSTALLED:
            return
        _HOOKS_INSTALLED = True
        atexit.register(close_all)
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _on_sigterm)


# ---------------------------------------------------------------- the readers


def _lengths_match(df: pd.DataFrame) -> pd.Series:
    return df["mu"].map(len) == 4 * df["latent_dim"]


SCHEMA = pa.DataFrameSchema(
    {
        "id": pa.Column("int64", pa.Check.gt(0), unique=True),
        "served_at": pa.Column("float64", pa.Check.gt(0)),
        "model_name": pa.Column(object, nullable=True),
        "version": pa.Column(object, nullable=True),
        "elbo": pa.Column("float64", pa.Check(lambda s: np.isfinite(s), error="ELBO must be finite")),
        "latent_dim": pa.Column("int64", pa.Check.gt(0)),
        "mu": pa.Column(object, pa.Check(lambda s: s.map(lambda v: isinstance(v, bytes)), error="mu must be bytes")),
        "image": pa.Column(
            object,
            pa.Check(lambda s: s.map(lambda v: isinstance(v, bytes) and len(v) == INPUT_DIM),
                     error=f"image must be {INPUT_DIM} bytes"),  # fmt: skip
            nullable=True,
        ),
    },
    checks=[pa.Check(_lengths_match, error="mu must hold latent_dim float32 values (4 bytes each)")],
    strict=True,
    ordered=True,
)


def table_exists(url: str) -> bool:
    """Whether anything was ever recorded at `url` (a SQLite file that does not exist is not created)."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and not Path(parsed.database).is_file():
        return False
    engine = make_engine(url, ENV_READER_PASSWORD)
    try:
        return sa.inspect(engine).has_table(TABLE_NAME)
    except sa.exc.SQLAlchemyError as exc:
        raise InferenceLogError(f"cannot reach {safe_url(url)}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from None
    finally:
        engine.dispose()


def read_since(url: str, after_id: int = 0, limit: int | None = None, with_images: bool = True) -> pd.DataFrame:
    """Rows with id > `after_id`, oldest first, at most `limit`; validated with `SCHEMA`.

    `with_images=False` leaves the image column empty (None): the monitor needs the scores only.
    """
    engine = make_engine(url, ENV_READER_PASSWORD)
    columns = [c if with_images or c.name != "image" else sa.null().label("image") for c in TABLE.columns]
    query = sa.select(*columns).where(TABLE.c.id > after_id).order_by(TABLE.c.id)
    if limit is not None:
        query = query.limit(limit)
    try:
        with engine.connect() as conn:
            rows = conn.execute(query).all()
    except sa.exc.SQLAlchemyError as exc:
        raise InferenceLogError(
            f"cannot read {TABLE_NAME} from {safe_url(url)}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        ) from None
    finally:
        engine.dispose()
    return as_frame(rows)


def as_frame(rows: list[Any]) -> pd.DataFrame:
    """Rows (tuples in `COLUMNS` order) as the validated table."""
    df = pd.DataFrame.from_records([tuple(r) for r in rows], columns=list(COLUMNS))
    df = df.astype({"id": "int64", "served_at": "float64", "elbo": "float64", "latent_dim": "int64"})
    for col in ("model_name", "version", "mu", "image"):  # None, str or bytes (PostgreSQL gives memoryview)
        values = [bytes(v) if isinstance(v, (bytes, bytearray, memoryview)) else v for v in df[col]]
        df[col] = pd.Series(values, index=df.index, dtype=object)
    try:
        return SCHEMA.validate(df, lazy=True)
    except (pa.errors.SchemaErrors, pa.errors.SchemaError) as exc:
        raise InferenceLogError(f"the inference table failed validation:\n{exc}") from None


def latent_means(df: pd.DataFrame) -> np.ndarray:
    """(N, L) float32 from the `mu` column; the rows must share one latent size."""
    dims = set(df["latent_dim"])
    if len(dims) > 1:
        raise InferenceLogError(f"rows of several latent sizes {sorted(dims)}: select one version's rows first")
    dim = dims.pop() if dims else 0
    if df.empty:
        return np.zeros((0, dim), np.float32)
    return np.frombuffer(b"".join(df["mu"]), dtype="<f4").reshape(len(df), dim).astype(np.float32)


def images(df: pd.DataFrame) -> np.ndarray:
    """(N, 784) uint8 from the `image` column; an error when some rows were recorded without their image."""
    missing = int(df["image"].isna().sum())
    if missing:
        raise InferenceLogError(f"{missing} of {len(df)} rows hold no image (recorded with serve.log_inputs: false)")
    if df.empty:
        return np.zeros((0, INPUT_DIM), np.uint8)
    return np.frombuffer(b"".join(df["image"]), dtype=np.uint8).reshape(len(df), INPUT_DIM).copy()
