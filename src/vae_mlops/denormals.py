"""Flush float32 denormals to zero while training: Adam's state of a weight with no gradient decays into them.

Adam's first moment of a weight whose gradient is exactly zero (the weights of MNIST's
always-black border pixels, the rows of a dead ReLU unit) shrinks by beta1 = 0.9 every
step. About 800 steps later (two epochs at batch 128) it falls below float32's smallest
normal number, 1.2e-38, and it never leaves: 0.9 times 4 units of the last place rounds back
to 4 units, so it stops there instead of reaching zero. x86 CPUs take a slow
microcode assist on every such operand, which makes epochs from the third on about a quarter
slower (BENCHMARKS.md has the figures). Flushing them to zero (the FTZ and DAZ bits) moves an
update by less than 1e-30.

The bits belong to each thread, and `torch.set_flush_denormal` sets only the calling one's:
torch's intra-op threads (an OpenMP pool, made at the first parallel op) keep theirs. So the
setting is also run once on every thread of that pool, through the OpenMP runtime torch runs it on.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_TASK = ctypes.CFUNCTYPE(None, ctypes.c_void_p)  # void (*fn)(void *), libgomp's parallel-region body


@contextlib.contextmanager
def flushed_denormals() -> Iterator[bool]:
    """Denormal results and operands read as zero inside, on every thread; yields whether the CPU supports it.

    torch offers no way to read the setting, so on leaving it is switched back off: the
    process default, which nothing else in the project changes. Not for nesting.
    """
    supported = set_flush_denormal(True)
    try:
        yield supported
    finally:
        if supported:
            set_flush_denormal(False)


def set_flush_denormal(on: bool) -> bool:
    """`torch.set_flush_denormal` on this thread and on every thread of torch's OpenMP pool."""
    supported = torch.set_flush_denormal(on)
    if supported and torch.get_num_threads() > 1:
        run_on_pool(lambda: torch.set_flush_denormal(on))
    return supported


def run_on_pool(work: Callable[[], object]) -> bool:
    """Run `work()` once on each of torch's intra-op threads (an OpenMP parallel region); False without libgomp."""
    gomp_parallel = _gomp_parallel()
    if gomp_parallel is None:
        log.debug("torch's OpenMP runtime not found: denormals are flushed on the calling thread only")
        return False
    task = _TASK(lambda _: work())  # kept referenced until GOMP_parallel returns
    gomp_parallel(task, None, ctypes.c_uint(torch.get_num_threads()), ctypes.c_uint(0))
    return True


@functools.cache
def _gomp_parallel() -> Callable[..., None] | None:
    """libgomp's `GOMP_parallel` as torch's own library resolves it.

    Looked up through libtorch_cpu's handle, which searches its own dependencies: another
    libgomp in the process (scikit-learn ships its own) runs another pool of threads.
    """
    if "OpenMP" not in torch.__config__.parallel_info().rsplit("ATen parallel backend:", 1)[-1]:
        return None
    lib = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        return ctypes.CDLL(str(lib)).GOMP_parallel
    except (OSError, AttributeError):
        return None
