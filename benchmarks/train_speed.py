"""`make bench`: the training loop against the PyTorch example's, and both against the FLOP bound.

Every row trains the PyTorch example's setting (784-400-20, bernoulli, batch 128,
Adam 1e-3) for `--epochs` epochs:

- `example`: pytorch/examples `vae/main.py`'s training loop as written, alone in a fresh
  process (no allocator setting, nothing else interleaved): torchvision `MNIST` (all 60,000
  training images) + `ToTensor` + `DataLoader(shuffle=True)`, its model, loss and `optim.Adam`.
- `baseline`: the same loop and loader in this process, from the project's initial weights,
  so that its test loss compares with the project's rows.
- `project*`: `train.train_epoch` (data on the device, one gather per epoch, fused
  Adam) on the split minus `train.val_size`, with autograd, under bf16 autocast, with the
  fused float32 step, and (`project`, last) with params.yaml's defaults: `train.precision: auto`,
  the fused bf16 step where the CPU or GPU has native bf16 (see `vae_mlops.precision`), the
  fused float32 step elsewhere.

Rows train different numbers of images, so every row is compared per image (images/s), and
the speedup is taken against the faster per image of `example` and `baseline`: what the
example itself costs, never a slower stand-in.
An epoch's time is the training pass only (shuffle, batches, steps; no validation),
and a row's s/epoch is the median over epochs 2..N (epoch 1 pays warm-up and CUDA
graph capture). The rows take their epochs in turn, so that another process's burst
on a shared machine slows every row alike. The bound is the epoch's matmul FLOPs at
this machine's measured matmul rate, in the row's precision. Writes `reports/bench.json`
(with the CPU's flags) and prints one table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import torchvision
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

from vae_mlops import atomic, cli_args, data, host_memory, metrics
from vae_mlops.archs.mlp import MLPNetwork
from vae_mlops.datasets import get_dataset
from vae_mlops.distributed import Single
from vae_mlops.errors import VaeMlopsError
from vae_mlops.model import VAE
from vae_mlops.params import EvaluateParams, Params, load_params
from vae_mlops.paths import Paths
from vae_mlops.precision import cpu_flags, native_bf16, resolve_precision
from vae_mlops.step import ELBOSums, build_stepper
from vae_mlops.train import (
    TrainingDiverged,
    build_state,
    resolve_device,
    split_train_val,
    to_unit_float,
    train_epoch,
)

log = logging.getLogger("benchmarks.train_speed")

# pytorch/examples vae/main.py; applied before the command line's -S, so params.yaml cannot drift from it
EXAMPLE = {
    "model.hidden_dim": 400,
    "model.latent_dim": 20,
    "model.likelihood": "bernoulli",
    "train.batch_size": 128,
    "train.lr": 1e-3,
    "train.beta": 1.0,
}
TARGETS = {  # on the 2-core CI-like machine
    "speedup_min": 4.0,  # images/s over the PyTorch example's own training loop
    "test_loss_gap_max": 0.5,  # the default's test loss may exceed the example's by this much (lower is better)
    "precision_gap_max": 0.3,  # the default against the fused float32 step (after 10 epochs)
    "project_s_per_epoch_max": 0.7,
    "overhead_ms_per_step_max": 0.5,  # (s/epoch - matmul bound) / steps
    "iwae1000_s_max": 40.0,
    "iwae_bf16_gap_max": 0.1,  # nats: bf16 decoding against float32's estimate, same seed
}
EVAL_CHUNK = 1000  # test images per forward pass of the test loss


# ---------------------------------------------------------------- the PyTorch example, as written there


class ExampleVAE(nn.Module):
    """pytorch/examples vae/main.py's model: fc21/fc22 give (mu, logvar); the decoder ends in a sigmoid."""

    def __init__(self, d: int, h: int, latent: int) -> None:
        super().__init__()
        self.d = d
        self.fc1, self.fc21, self.fc22 = nn.Linear(d, h), nn.Linear(h, latent), nn.Linear(h, latent)
        self.fc3, self.fc4 = nn.Linear(latent, h), nn.Linear(h, d)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h1 = F.relu(self.fc1(x.view(-1, self.d)))
        mu, logvar = self.fc21(h1), self.fc22(h1)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return torch.sigmoid(self.fc4(F.relu(self.fc3(z)))), mu, logvar


def example_loss(recon_x: Tensor, x: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """BCE-sum + KL, the example's `loss_function` (Kingma & Welling 2014, Appendix B)."""
    bce = F.binary_cross_entropy(recon_x, x.view(-1, recon_x.shape[-1]), reduction="sum")
    return bce - 0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())


EXAMPLE_LAYERS = ("fc1", "fc21", "fc22", "fc3", "fc4")  # `ExampleVAE`'s, in the order of `MLPNetwork.LAYERS`'s


@torch.no_grad()
def copy_weights(src: nn.Module, dst: nn.Module, to_example: bool) -> None:
    """Same function, other parametrisation: logvar = 2 log_std, so fc22 = 2 * fc_log_std."""
    if len(MLPNetwork.LAYERS) != len(EXAMPLE_LAYERS):
        raise VaeMlopsError(
            f"the baseline starts from the project's weights, but the mlp's layers {MLPNetwork.LAYERS} no longer "
            f"match the PyTorch example's {EXAMPLE_LAYERS}: pair them in benchmarks/train_speed.py"
        )
    for ours, theirs in zip(MLPNetwork.LAYERS, EXAMPLE_LAYERS):
        a, b = (ours, theirs) if to_example else (theirs, ours)
        scale = (2.0 if to_example else 0.5) if ours == "fc_log_std" else 1.0
        for p in ("weight", "bias"):
            getattr(getattr(dst, b), p).copy_(getattr(getattr(src, a), p) * scale)


def example_loader(raw_dir: Path, root: Path, batch_size: int, limit: int | None = None) -> DataLoader:
    """torchvision's MNIST over this repo's verified files (linked, never downloaded), as the example loads it.

    All 60,000 training images, as the example trains on; `limit` keeps the first N (quick runs).
    """
    folder = root / "MNIST" / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "t10k"):
        for name in (f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte"):
            (folder / name).symlink_to((raw_dir / name).resolve())
    train = datasets.MNIST(str(root), train=True, download=False, transform=transforms.ToTensor())
    return DataLoader(train if limit is None else Subset(train, range(limit)), batch_size=batch_size, shuffle=True)


# The example on its own: a fresh process, the example's own seeding and initialisation, only its loop timed.
EXAMPLE_CHILD = """
import json, sys, tempfile, time, torch
from pathlib import Path
from benchmarks.train_speed import ExampleVAE, example_epoch, example_loader
raw_dir, epochs, threads, seed, batch, lr, limit = sys.argv[1:]
torch.set_num_threads(int(threads))
torch.manual_seed(int(seed))
with tempfile.TemporaryDirectory(prefix="bench-example-") as tmp:
    loader = example_loader(Path(raw_dir), Path(tmp), int(batch), None if limit == "none" else int(limit))
    model = ExampleVAE(784, 400, 20)
    optimizer = torch.optim.Adam(model.parameters(), lr=float(lr))
    times = []
    for _ in range(int(epochs)):
        t0 = time.perf_counter()
        example_epoch(model, loader, optimizer, torch.device("cpu"))
        times.append(time.perf_counter() - t0)
print(json.dumps({"epoch_seconds": times, "images": len(loader.dataset)}))
"""


def run_example_alone(params: Params, raw_dir: Path, epochs: int, limit: int | None) -> tuple[list[float], int]:
    """Seconds per epoch and images per epoch of the example's loop in a process of its own (CPU)."""
    args = [str(raw_dir), str(epochs), str(torch.get_num_threads()), str(params.train.seed),
            str(params.train.batch_size), str(params.train.lr), "none" if limit is None else str(limit)]  # fmt: skip
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", EXAMPLE_CHILD, *args], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise VaeMlopsError(f"the example's own run failed: {proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out["epoch_seconds"], out["images"]


def example_epoch(model: ExampleVAE, loader, optimizer: torch.optim.Optimizer, device: torch.device) -> float:
    """The example's `train(epoch)` without its prints: mean loss per image."""
    model.train()
    train_loss = 0.0
    for x, _ in loader:
        x = x.to(device)
        optimizer.zero_grad()
        recon, mu, logvar = model(x)
        loss = example_loss(recon, x, mu, logvar)
        loss.backward()
        train_loss += loss.item()
        optimizer.step()
    return train_loss / len(loader.dataset)


# ---------------------------------------------------------------- rates and bounds


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def layer_shapes(model: VAE) -> list[tuple[int, int]]:
    """(in, out) of every Linear: 784-400, 400-20 twice, 20-400, 400-784."""
    return [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]


def train_flops_per_image(model: VAE) -> int:
    """Forward 2 * sum(in * out) multiply-adds per image; backward twice that (input and weight grads)."""
    return 3 * 2 * sum(i * o for i, o in layer_shapes(model))


def rate(work: Callable[[], None], flops: float, device: torch.device, min_s: float, windows: int = 5) -> float:
    """Best FLOP/s over `windows` timed windows (at least 2 calls each): a peak, which a busy neighbour lowers less."""
    work()  # warm-up: allocation, kernel selection
    sync(device)
    best = 0.0
    for _ in range(windows):
        reps, t0 = 0, time.perf_counter()
        while reps < 2 or time.perf_counter() - t0 < min_s / windows:
            work()
            reps += 1
        sync(device)
        best = max(best, flops * reps / (time.perf_counter() - t0))
    return best


def matmul_rate(n: int, dtype: torch.dtype, device: torch.device, min_s: float) -> float:
    """Square n x n matmuls: this machine's practical peak."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    return rate(lambda: torch.mm(a, b), 2.0 * n**3, device, min_s)


def step_matmul_rate(
    shapes: list[tuple[int, int]], batch: int, dtype: torch.dtype, device: torch.device, min_s: float
) -> float:
    """A step's 15 matmuls at their real shapes: y = x W', dx = dy W, dW = dy' x for every layer."""
    rand = lambda *shape: torch.randn(shape, device=device).to(dtype)  # noqa: E731
    mats = [(rand(batch, i), rand(o, i), rand(batch, o)) for i, o in shapes]

    def step() -> None:
        for x, w, dy in mats:
            torch.mm(x, w.t()), torch.mm(dy, w), torch.mm(dy.t(), x)

    return rate(step, 3 * 2.0 * batch * sum(i * o for i, o in shapes), device, min_s)


# ---------------------------------------------------------------- the rows


@dataclass
class Row:
    name: str
    what: str
    precision: str  # which bound applies: float32 | bf16
    epoch_s: list[float]
    test_loss: float  # NaN where the row's model is not tested (the example alone)
    images: int  # trained per epoch

    @property
    def s_per_epoch(self) -> float:
        return statistics.median(self.epoch_s[1:] or self.epoch_s)


def with_train(params: Params, **changes) -> Params:
    return dataclasses.replace(params, train=dataclasses.replace(params.train, **changes))


class ProjectRun:
    """`train_epoch` as `fit` calls it (no validation); the one-off setup (state, stepper) happens here."""

    def __init__(self, params: Params, x_train: Tensor, device: torch.device, epochs: int) -> None:
        self.state = build_state(params, device)
        self.cfg, self.x_train, self.epochs = params.train, x_train, epochs
        self.stepper = build_stepper(self.state.model, self.state.optimizer, self.cfg, Single())

    def epoch(self) -> None:
        s = self.state
        out = train_epoch(s, self.x_train, self.cfg, s.model.config.likelihood, self.epochs, self.stepper)
        loss, _, _, bad = out.tolist()  # the loop's one host sync per epoch
        s.epoch += 1
        if bad >= 0 or not math.isfinite(loss):
            raise TrainingDiverged(f"bench: loss became NaN/inf at epoch {s.epoch}, batch {int(bad)}")

    def trained(self) -> VAE:
        return self.state.model


class BaselineRun:
    """The example's loop from the project's initial weights; shuffle and noise come from the global RNG, as there."""

    def __init__(self, params: Params, loader, device: torch.device) -> None:
        self.ours = build_state(params, device).model
        cfg = self.ours.config
        self.model = ExampleVAE(cfg.input_dim, cfg.hidden_dim, cfg.latent_dim).to(device)
        copy_weights(self.ours, self.model, to_example=True)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=params.train.lr)
        self.loader, self.device, self.epochs = loader, device, 0

    def epoch(self) -> None:
        loss = example_epoch(self.model, self.loader, self.optimizer, self.device)
        self.epochs += 1
        if not math.isfinite(loss):
            raise TrainingDiverged(f"bench: the baseline's loss became NaN/inf at epoch {self.epochs}")

    def trained(self) -> VAE:
        """The trained weights as a project `VAE`, so every row is tested by the same code."""
        copy_weights(self.model, self.ours, to_example=False)
        return self.ours


def timed(work: Callable[[], None], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    work()
    sync(device)
    return time.perf_counter() - t0


@torch.no_grad()
def test_loss(model: VAE, x_test: Tensor, seed: int) -> float:
    """Mean BCE-sum + KL per test image, one seeded noise draw shared by every row."""
    g = torch.Generator(device=x_test.device).manual_seed(seed)
    eps = torch.randn((len(x_test), model.config.latent_dim), generator=g, device=x_test.device)
    sums_of = ELBOSums(model.eval(), "float32", fused=False)
    total = sum(sums_of(x, e).sum() for x, e in zip(x_test.split(EVAL_CHUNK), eps.split(EVAL_CHUNK)))
    return float(total) / len(x_test)


# ---------------------------------------------------------------- report


def machine(device: torch.device) -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in _cpuinfo() if ln.startswith("model name")), platform.processor())
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": cpu_flags(),
        "native_bf16": native_bf16(device),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        # OpenMP's idle threads spin unless PASSIVE: on a busy 2-core machine that multiplies step times
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def report(rows: list[Row], batch: int, bound_s_per_image: dict[str, float]) -> list[dict]:
    """One dict a row; `vs_example` is images/s over the example's (the faster per image of `example`, `baseline`)."""
    reference = max(r.images / r.s_per_epoch for r in rows if r.name in ("example", "baseline"))
    out = []
    for r in rows:
        s, bound = r.s_per_epoch, r.images * bound_s_per_image[r.precision]
        out.append({
            "name": r.name, "what": r.what, "precision": r.precision, "epoch_seconds": r.epoch_s,
            "train_images": r.images, "s_per_epoch": s, "images_per_s": r.images / s,
            "vs_example": r.images / s / reference, "bound_s_per_epoch": bound, "vs_bound": s / bound,
            "overhead_ms_per_step": 1000 * (s - bound) / math.ceil(r.images / batch), "test_loss": r.test_loss,
        })  # fmt: skip
    return out


COLUMNS = ("row", "images", "s/epoch", "images/s", "x example", "bound s/epoch", "x bound", "overhead ms/step",
           "test loss")  # fmt: skip


def print_table(result: dict) -> None:
    """One table: a line per row, the matmul rates and the targets underneath."""
    where = f"{result['machine']['device']}, {result['machine']['threads']} threads"
    table = Table(title=f"batch {result['batch_size']}, {where}")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col == "row" else "right")
    for r in result["rows"]:
        table.add_row(
            r["name"], f"{r['train_images']:,}", f"{r['s_per_epoch']:.3f}", f"{r['images_per_s']:,.0f}",
            f"{r['vs_example']:.2f}",
            f"{r['bound_s_per_epoch']:.3f}", f"{r['vs_bound']:.2f}", f"{r['overhead_ms_per_step']:.2f}",
            f"{r['test_loss']:.2f}",
        )  # fmt: skip
    table.caption = _caption(result)
    Console(width=max(150, Console().width)).print(table)


def _caption(result: dict) -> str:
    t, m, met = result["targets"], result["matmul_gflops"], result["targets_met"]
    mark = {True: "[green]met[/]", False: "[red]missed[/]"}
    return "\n".join([
        f"s/epoch: {result['timing']}; bound: the epoch's matmul FLOPs at the measured {result['matmul_size']}² rate; "
        "load average {:.1f} -> {:.1f}".format(*result["machine"]["load_avg_1min"]),
        f"matmul GFLOP/s: float32 {m['float32']:.4g}, bf16 {m['bf16']:.4g}; at the model's shapes, "
        f"batch {result['batch_size']}: float32 {m['float32_step']:.4g}, bf16 {m['bf16_step']:.4g}",
        f"target speedup (images/s) >= {t['speedup_min']}, test loss at most the baseline's + {t['test_loss_gap_max']} nats: "
        f"{result['speedup']:.2f}, gap {result['test_loss_gap']:+.2f} {mark[met['speedup']]}",
        f"target project <= {t['project_s_per_epoch_max']} s/epoch: {result['project_s_per_epoch']:.2f} "
        f"({result['project_precision']}) {mark[met['project_s_per_epoch']]}",
        f"target overhead <= {t['overhead_ms_per_step_max']} ms/step: {result['project_overhead_ms_per_step']:.2f} "
        f"{mark[met['overhead_ms_per_step']]}",
        f"target default within {t['precision_gap_max']} nats of fused float32's test loss: "
        f"{result['precision_test_loss_gap']:+.2f} {mark[met['precision_gap']]}",
        f"target IWAE k=1000 on 10,000 images <= {t['iwae1000_s_max']} s: k={result['iwae_k']} on "
        f"{result['iwae_images']} images {result['iwae1000_s']:.1f} s (bound {result['iwae_bound_s']:.1f} s); "
        f"bf16 decoding {result['iwae1000_bf16_s']:.1f} s, {result['iwae_bf16_gap']:+.3f} nats "
        f"(serves within {t['iwae_bf16_gap_max']}) {mark[met['iwae1000_s']]}",
    ])  # fmt: skip


# ---------------------------------------------------------------- the whole benchmark

EXAMPLE_ALONE = "pytorch/examples vae/main.py's loop alone in its own process"
BASELINE = "the same loop and loader in this process, from the project's initial weights"
VARIANTS = (  # name, what, precision, train params changed; `project` (the defaults) follows them
    ("project-autograd", "train_epoch, autograd (fused: false)", "float32", {"fused": False, "precision": "float32"}),
    ("project-bf16-autocast", "train_epoch, autograd, bf16 autocast", "bf16", {"fused": False, "precision": "bf16"}),
    ("project-float32", "train_epoch, fused float32 step", "float32", {"fused": True, "precision": "float32"}),
)


@dataclass(frozen=True)
class BenchData:
    """The images every row trains and is tested on, and the folder torchvision reads the same files from."""

    raw_dir: Path
    train_idx: Tensor  # (n,) indices into the training split, the hold-out removed
    x_train: Tensor  # (n, 784) on the device
    x_test: Tensor  # (m, 784) on the device


def load_bench_data(params: Params, paths: Paths, device: torch.device, limit: int | None) -> BenchData:
    """The verified files (`dvc repro download` fetches them), `val_size` held out, at most `limit` images kept."""
    spec, raw_dir = get_dataset(params.data.dataset), paths.raw_dir(params.data.dataset)
    images, _ = data.load_split(raw_dir, spec, "train")
    train_idx = split_train_val(len(images), params.train.val_size, params.train.seed)[0][:limit]
    x_test = data.load_split(raw_dir, spec, "test")[0][:limit]
    return BenchData(raw_dir, train_idx, to_unit_float(images[train_idx], device), to_unit_float(x_test, device))


def train_rows(
    params: Params, bd: BenchData, device: torch.device, epochs: int, limit: int | None
) -> tuple[list[Row], VAE]:
    """Every row from the same initial weights, epochs taken in turn: a burst of another process hits all rows alike.

    Also returns the `project` row's trained model.
    """
    with tempfile.TemporaryDirectory(prefix="bench-mnist-") as tmp:
        loader = example_loader(bd.raw_dir, Path(tmp), params.train.batch_size, limit)
        runs = [("baseline", BASELINE, "float32", BaselineRun(params, loader, device))]
        for name, what, precision, changes in VARIANTS:
            runs.append((name, what, precision, ProjectRun(with_train(params, **changes), bd.x_train, device, epochs)))
        chosen = resolve_precision(params.train.precision, device)
        what = f"train_epoch, the defaults (train.precision: {params.train.precision} -> {chosen})"
        runs.append(("project", what, chosen, ProjectRun(params, bd.x_train, device, epochs)))
        torch.manual_seed(params.train.seed)  # as the example does; nothing else draws from the global RNG
        times: dict[str, list[float]] = {name: [] for name, *_ in runs}
        for epoch in range(1, epochs + 1):
            for name, _, _, run in runs:
                times[name].append(timed(run.epoch, device))
            log.info("bench: epoch %d: %s", epoch, ", ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items()))
    seed = params.evaluate.seed
    images = {name: len(loader.dataset) if name == "baseline" else len(bd.x_train) for name, *_ in runs}
    rows = [Row(name, what, p, times[name], test_loss(run.trained(), bd.x_test, seed), images[name])
            for name, what, p, run in runs]  # fmt: skip
    if device.type == "cpu":
        alone, n = run_example_alone(params, bd.raw_dir, epochs, limit)
        rows.insert(0, Row("example", EXAMPLE_ALONE, "float32", alone, math.nan, n))
    return rows, runs[-1][3].trained()


def time_iwae(
    model: VAE, x_test: Tensor, k: int, cfg: EvaluateParams, mm_dtype: torch.dtype | None = None
) -> tuple[float, float]:
    """Seconds and mean IWAE -log p(x) of `metrics.iwae_bound`, what the evaluate stage runs (float32 decoding)."""
    sync(x_test.device)
    t0 = time.perf_counter()
    nll = -metrics.iwae_bound(model, x_test, k, cfg.batch_size, cfg.seed, mm_dtype).mean().item()
    sync(x_test.device)
    return time.perf_counter() - t0, nll


def measure_rates(model: VAE, batch: int, device: torch.device, size: int, min_s: float) -> dict[str, float]:
    """GFLOP/s of square matmuls (the peak) and of a step's matmuls at the model's shapes."""
    shapes = layer_shapes(model)
    return {
        "float32": matmul_rate(size, torch.float32, device, min_s) / 1e9,
        "bf16": matmul_rate(size, torch.bfloat16, device, min_s) / 1e9,
        "float32_step": step_matmul_rate(shapes, batch, torch.float32, device, min_s) / 1e9,
        "bf16_step": step_matmul_rate(shapes, batch, torch.bfloat16, device, min_s) / 1e9,
    }


def summarise(rows: list[Row], model: VAE, gflops: dict[str, float], n: int, batch: int) -> dict:
    """The headline keys, the bounds and every row; `project` is the last row, `baseline` the first."""
    steps, flops = math.ceil(n / batch), n * train_flops_per_image(model)
    bounds = {"float32": flops / gflops["float32"] / 1e9, "bf16": flops / gflops["bf16"] / 1e9}
    table = report(rows, batch, {k: v / n for k, v in bounds.items()})
    baseline, project = next(r for r in table if r["name"] == "baseline"), table[-1]
    float32 = next(r for r in table if r["name"] == "project-float32")
    return {
        "project_s_per_epoch": project["s_per_epoch"],
        "project_precision": project["precision"],
        "project_bound_s_per_epoch": project["bound_s_per_epoch"],
        "project_overhead_ms_per_step": project["overhead_ms_per_step"],
        "float32_test_loss": float32["test_loss"],
        "precision_test_loss_gap": project["test_loss"] - float32["test_loss"],
        "baseline_s_per_epoch": baseline["s_per_epoch"],
        "speedup": project["vs_example"],
        "bound_s_per_epoch": bounds["float32"],
        "bound_bf16_s_per_epoch": bounds["bf16"],
        "bound_step_shapes_s_per_epoch": flops / gflops["float32_step"] / 1e9,
        "project_test_loss": project["test_loss"],
        "baseline_test_loss": baseline["test_loss"],
        "test_loss_gap": project["test_loss"] - baseline["test_loss"],
        "train_images": n,
        "batch_size": batch,
        "steps_per_epoch": steps,
        "train_flops_per_epoch": flops,
        "params": sum(p.numel() for p in model.parameters()),
        "matmul_gflops": gflops,
        "rows": table,
    }


def targets_met(result: dict) -> dict[str, bool]:
    bf16_ok = abs(result["iwae_bf16_gap"]) <= TARGETS["iwae_bf16_gap_max"]  # bf16 decoding counts only if it serves
    bf16_iwae = result["iwae1000_bf16_s"] if bf16_ok else math.inf
    no_worse = result["test_loss_gap"] <= TARGETS["test_loss_gap_max"]  # a faster row may not buy speed with loss
    return {
        "speedup": result["speedup"] >= TARGETS["speedup_min"] and no_worse,
        "project_s_per_epoch": result["project_s_per_epoch"] <= TARGETS["project_s_per_epoch_max"],
        "overhead_ms_per_step": result["project_overhead_ms_per_step"] <= TARGETS["overhead_ms_per_step_max"],
        "precision_gap": abs(result["precision_test_loss_gap"]) <= TARGETS["precision_gap_max"],
        "iwae1000_s": min(result["iwae1000_s"], bf16_iwae) <= TARGETS["iwae1000_s_max"],
    }


def bench(
    params: Params, paths: Paths, epochs: int, iwae_k: int, limit: int | None, matmul_size: int, min_s: float
) -> dict:
    """Every row, the rates, the bounds and the IWAE time: what `reports/bench.json` holds."""
    device = resolve_device(params.train.device)
    params = with_train(params, device=device.type, cuda_graphs=device.type == "cuda", compile=False)
    load_before = os.getloadavg()[0]  # other processes on a shared CPU skew every timing: recorded, not hidden
    bd = load_bench_data(params, paths, device, limit)
    rows, model = train_rows(params, bd, device, epochs, limit)
    iwae_s, nll = time_iwae(model, bd.x_test, iwae_k, params.evaluate)
    iwae_bf16_s, nll_bf16 = time_iwae(model, bd.x_test, iwae_k, params.evaluate, torch.bfloat16)  # same seed
    gflops = measure_rates(model, params.train.batch_size, device, matmul_size, min_s)
    result = summarise(rows, model, gflops, len(bd.x_train), params.train.batch_size)
    cfg = model.config
    decode_flops = 2 * (cfg.latent_dim * cfg.hidden_dim + cfg.hidden_dim * cfg.input_dim)  # per (sample, image)
    result.update({
        "iwae1000_s": iwae_s,
        "iwae_bound_s": len(bd.x_test) * iwae_k * decode_flops / gflops["float32"] / 1e9,
        "iwae_k": iwae_k,
        "iwae_images": len(bd.x_test),
        "iwae_nll": nll,
        "iwae1000_bf16_s": iwae_bf16_s,
        "iwae_bf16_nll": nll_bf16,
        "iwae_bf16_gap": nll_bf16 - nll,
        "epochs": epochs,
        "timing": "median of epochs 2..N" if epochs > 1 else "epoch 1 (only one)",
        "test_images": len(bd.x_test),
        "matmul_size": matmul_size,
        "targets": TARGETS,
        "machine": {**machine(device), "load_avg_1min": [load_before, os.getloadavg()[0]]},
    })  # fmt: skip
    result["targets_met"] = targets_met(result)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_speed", description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3, help="epochs per row (default 3)")
    p.add_argument("--iwae-k", type=int, default=1000, help="IWAE samples per test image (default 1000)")
    p.add_argument("--limit", type=int, default=None, help="use at most N training and N test images")
    p.add_argument("--device", default=None, help="cpu | cuda | auto (default: train.device)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: train.threads; 0: torch's)")
    p.add_argument("--matmul-size", type=int, default=2048, help="n of the n x n matmuls that measure the peak")
    p.add_argument("--min-seconds", type=float, default=1.0, help="time each matmul rate for at least this long")
    return cli_args.add_common_args(p)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    paths = Paths(args.root)
    try:
        overrides = {**EXAMPLE, **cli_args.overrides(args), **({"train.device": args.device} if args.device else {})}
        params = load_params(args.params, overrides)
        threads = params.train.threads if args.threads is None else args.threads
        if threads:
            torch.set_num_threads(threads)
        host_memory.keep_freed_memory()  # as the train stage does; every row runs in this process under it
        result = bench(params, paths, args.epochs, args.iwae_k, args.limit, args.matmul_size, args.min_seconds)
        atomic.write_json(paths.bench_file, result)
    except VaeMlopsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_table(result)
    print(f"written to {paths.bench_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
