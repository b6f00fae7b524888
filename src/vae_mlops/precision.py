"""Which arithmetic the training step runs in: `train.precision: auto` picks bf16 where the hardware has it.

bf16 matmuls pay only on CPUs with AVX512-BF16 or AMX (elsewhere they are emulated and
slower than float32) and on GPUs with bf16 units; everywhere else float32 is the fast path.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

PRECISIONS = ("auto", "float32", "bf16")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 matmuls


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """The CPU's feature flags (Linux); empty where /proc/cpuinfo cannot be read."""
    return list(_read_flags(cpuinfo))


@functools.cache  # read once per process: every `ELBOSums` asks
def _read_flags(cpuinfo: Path) -> tuple[str, ...]:
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return ()
    flags = next((ln.split(":", 1)[1] for ln in lines if ln.startswith("flags")), "")
    return tuple(sorted(set(flags.split())))


def native_bf16(device: torch.device, flags: list[str] | None = None) -> bool:
    """True where bf16 matmuls run natively: a CUDA GPU with bf16, or a CPU with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return any(f in BF16_CPU_FLAGS for f in (cpu_flags() if flags is None else flags))


def resolve_precision(name: str, device: torch.device, flags: list[str] | None = None) -> str:
    """`auto` -> `bf16` where `native_bf16`, else `float32`; an explicit `float32` or `bf16` stays."""
    if name not in PRECISIONS:
        raise ValueError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    if name != "auto":
        return name
    return "bf16" if native_bf16(device, flags) else "float32"
