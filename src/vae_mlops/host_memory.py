"""Keep freed host memory in the process: a training step's large tensors then reuse it without page faults.

glibc's malloc serves every block over its mmap threshold (128 KiB at first) with a fresh
mmap and unmaps it on free, and trims the heap's top back to the kernel. A training step
allocates and frees blocks of about 1 MB every time (the bf16 copies of the wide weights, their
gradients, the logits), so each step pays a page fault and a zeroed page per 4 KiB: about 100 a step. PyTorch's CPU tuning guide swaps in jemalloc or tcmalloc for this;
raising glibc's two thresholds does the same here without a preloaded library, and changes no result.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import platform

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameters, glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling on 64-bit (HEAP_MAX / 2): blocks up to 32 MiB come from the heap
TRIM_THRESHOLD = 256 << 20  # free memory at the heap's top kept for reuse before any is returned


@functools.cache  # process-wide setting: once is enough
def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds; True when set, False where the C library is not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    ok = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    log.debug("glibc malloc keeps freed memory (mmap threshold %d MiB): %s", MMAP_THRESHOLD >> 20, ok)
    return ok
