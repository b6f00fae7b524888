"""The least a training step can take with torch's kernels: each kernel it cannot do without, timed alone.

The step of `train.precision` (params.yaml's `auto` by default) needs, whatever the Python
around them: its matmuls (the two wide layers in the step's matmul dtype, the three narrow
ones in float32), Adam's fused kernel over every parameter, in bf16 the casts of the two wide
weights and their gradients (torch has no CPU bf16 matmul with a float32 output), and the
likelihood's sum and gradient. Each is timed alone, with hot caches, at batch 128 on the default
network; their sum is a floor under the step, and under s/epoch and per-step overhead as
`make bench` computes them. The real step is timed in the same process, in turn with the kernels,
so the gap between the two is what any fusion of the step could still win here.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from benchmarks.step_setup import add_step_arguments, build_cpu_step
from benchmarks.train_speed import TARGETS, matmul_rate, train_flops_per_image
from vae_mlops.archs.mlp import MLPNetwork
from vae_mlops.denormals import flushed_denormals
from vae_mlops.step import Stepper
from vae_mlops.train import TrainState, make_optimizer

TRAIN_IMAGES = 55_000  # the split minus train.val_size, as `make bench` trains
TARGET_S_PER_EPOCH = TARGETS["project_s_per_epoch_max"]
TARGET_OVERHEAD_MS = 0.5
Mm = tuple[Tensor, Tensor]  # the two operands of one torch.mm


def median_us(work: Callable[[], object], reps: int, blocks: int = 5) -> float:
    """Median over `blocks` of the mean time of `reps` calls, in µs, after a warm-up block."""
    for _ in range(reps):
        work()
    times = []
    for _ in range(blocks):
        t0 = time.perf_counter()
        for _ in range(reps):
            work()
        times.append((time.perf_counter() - t0) / reps * 1e6)
    return statistics.median(times)


def layer_matmuls(layer: nn.Linear, batch: int, dtype: torch.dtype, first: bool, g: torch.Generator) -> list[Mm]:
    """A Linear layer's matmuls in a step at batch `batch`: y = x W', dW = dy' x and, but for the first, dx = dy W."""
    x = torch.rand((batch, layer.in_features), generator=g).to(dtype)
    dy = torch.rand((batch, layer.out_features), generator=g).to(dtype)
    w = layer.weight.detach().to(dtype)
    return [(x, w.t()), (dy.t(), x), *([] if first else [(dy, w)])]


def kernels(state: TrainState, stepper: Stepper, batch: int, mm_dtype: torch.dtype) -> dict[str, Callable[[], object]]:
    """The step's indispensable kernels on tensors of its real shapes, keyed by what they are.

    The layers are the model's (`MLPNetwork.LAYERS`); the wide ones, those on the pixels, run in the
    step's matmul dtype and the narrow ones in float32, as `accel`'s fused step runs them.
    """
    model, d = state.model, state.model.config.input_dim
    g = torch.Generator().manual_seed(0)
    layers = {name: getattr(model, name) for name in MLPNetwork.LAYERS}
    wide = [name for name, m in layers.items() if d in (m.in_features, m.out_features)]
    mms: dict[bool, list[Mm]] = {True: [], False: []}
    for i, (name, m) in enumerate(layers.items()):
        is_wide = name in wide
        mms[is_wide] += layer_matmuls(m, batch, mm_dtype if is_wide else torch.float32, i == 0, g)
    x, logits = torch.rand((batch, d), generator=g), torch.rand((batch, d), generator=g) * 8 - 4
    likelihood = model.likelihood
    one = torch.tensor(1.0)
    stepper(x, torch.randn((batch, model.config.latent_dim), generator=g), torch.tensor([1.0, 1.0]), full=True)
    # Adam on a copy of the model and its gradients, so that the timing loop leaves the real weights alone
    twin = copy.deepcopy(model)
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = p.grad.clone()
    adam = make_optimizer(twin, 1e-3, torch.device("cpu"))
    adam.step()  # creates Adam's state, as a first step does
    dtype = str(mm_dtype).removeprefix("torch.")
    narrow = [name for name in layers if name not in wide]
    out = {
        f"wide matmuls ({dtype}: {', '.join(wide)}; forward, dX, dW)": lambda: [torch.mm(a, b) for a, b in mms[True]],
        f"narrow matmuls (float32: {', '.join(narrow)}; forward, dX, dW)": lambda: [
            torch.mm(a, b) for a, b in mms[False]
        ],
        "Adam (torch's fused kernel, every parameter)": adam.step,
        "likelihood: reconstruction sum and its gradient": lambda: (
            likelihood.recon_sum(logits, x),
            likelihood.recon_grad(logits, x, one),
        ),
    }
    if mm_dtype != torch.float32:
        weights = [layers[name].weight.detach() for name in wide]
        low = [w.to(mm_dtype) for w in weights]
        out[f"casts: {', '.join(wide)} weights to {dtype}; their gradients to float32"] = lambda: (
            [w.to(mm_dtype) for w in weights],
            [w.float() for w in low],
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.step_floor", description=__doc__.splitlines()[0])
    add_step_arguments(p)
    p.add_argument("--reps", type=int, default=200, help="calls per timed block")
    args = p.parse_args(argv)
    cfg, state, stepper = build_cpu_step(args)
    mm_dtype = stepper.module.mm_dtype or torch.float32
    parts = kernels(state, stepper, cfg.batch_size, mm_dtype)
    g = torch.Generator().manual_seed(1)
    config = state.model.config
    x = torch.rand((cfg.batch_size, config.input_dim), generator=g)
    eps = torch.randn((cfg.batch_size, config.latent_dim), generator=g)
    coef = torch.full((2,), 1.0 / cfg.batch_size)
    rounds: dict[str, list[float]] = {}
    with flushed_denormals():  # as `train_epoch` runs the step: 3,000 steps would otherwise reach them
        for _ in range(3):  # kernels and the real step in turn, so that a burst on a shared machine hits both
            for name, work in [*parts.items(), ("the real step", lambda: stepper(x, eps, coef, full=True))]:
                rounds.setdefault(name, []).append(median_us(work, args.reps))
    times = {name: statistics.median(v) for name, v in rounds.items()}
    step_us = times.pop("the real step")
    floor_us = sum(times.values())
    steps = -(-TRAIN_IMAGES // cfg.batch_size)
    rate = matmul_rate(2048, mm_dtype, torch.device("cpu"), min_s=1.0)  # `make bench`'s peak and bound
    bound_s = TRAIN_IMAGES * train_flops_per_image(state.model) / rate
    load = os.getloadavg()[0]
    print(
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, load {load:.1f}, {torch.get_num_threads()} "
        f"threads, {stepper.module.precision} step, batch {cfg.batch_size}; "
        f"2048² {str(mm_dtype).removeprefix('torch.')} matmul: {rate / 1e9:.1f} GFLOP/s"
    )
    print(f"{'kernel':<82} {'µs/step':>8}")
    for name, us in times.items():
        print(f"{name:<82} {us:>8.0f}")
    print(f"{'floor: their sum':<82} {floor_us:>8.0f}")
    print(f"{'the real step, timed in turn with them':<82} {step_us:>8.0f}")
    floor_s = floor_us * steps / 1e6
    print(
        f"floor: {floor_s:.2f} s/epoch over {steps} steps (target {TARGET_S_PER_EPOCH}); overhead over the matmul "
        f"bound ({bound_s:.2f} s/epoch): at least {(floor_s - bound_s) / steps * 1e3:.2f} ms/step "
        f"(target {TARGET_OVERHEAD_MS}); the real step: {step_us * steps / 1e6:.2f} s/epoch"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
