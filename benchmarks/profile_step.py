"""Where a training epoch's time goes: `train_epoch` on random images under torch.profiler, per op.

No dataset download: `--images` random (N, 784) images on [0, 1] stand in for MNIST (the step's
work does not depend on the pixel values). Prints the top ops by self CPU time in ms per step, and
the epoch's wall time. On a shared machine compare variants in one process, not across runs.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.step_setup import add_step_arguments, build_cpu_step
from vae_mlops.train import train_epoch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=55_000, help="random training images per epoch (default 55,000)")
    add_step_arguments(p)
    p.add_argument("--top", type=int, default=15, help="ops to list")
    args = p.parse_args(argv)
    cfg, state, stepper = build_cpu_step(args)
    x = torch.rand(args.images, 784, generator=torch.Generator().manual_seed(0))
    steps = -(-args.images // cfg.batch_size)

    def epoch() -> float:
        t0 = time.perf_counter()
        train_epoch(state, x, cfg, state.model.config.likelihood, 1, stepper).tolist()
        state.epoch += 1
        return time.perf_counter() - t0

    warm = epoch()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        profiled = epoch()
    plain = epoch()
    print(f"epoch s: warm-up {warm:.3f}, profiled {profiled:.3f}, plain {plain:.3f} ({steps} steps)")
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows)
    print(f"{'op':<45} {'calls/step':>10} {'ms/step':>8} {'share':>6}")
    for e in rows[: args.top]:
        ms = e.self_cpu_time_total / 1000 / steps
        print(f"{e.key[:45]:<45} {e.count / steps:>10.1f} {ms:>8.3f} {e.self_cpu_time_total / total:>6.1%}")
    print(f"{'all ops':<45} {'':>10} {total / 1000 / steps:>8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
