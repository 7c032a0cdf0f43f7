"""How the process's C library treats freed memory: kept for reuse, for every stage that runs tensors.

A training step, and a model's forward, allocate and free the same megabyte-sized tensors over and over
(a batch, its activations, gradients, casts). By default glibc maps each such block afresh, or trims the
heap once it is freed, and the kernel then zero-fills its pages again on first touch. That cost belongs
to the C library, not to the CPU: ~15% of a d = 640 SAE step at 1,024 tokens, and 18% of Gemma 3 270M's
float32 forward at 16 x 128 tokens on an AVX2-only EPYC (631 -> 773 tokens/s, benchmarks/README.md).
"""

from __future__ import annotations

import ctypes
import functools
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>


@functools.cache  # once per process
def keep_freed_memory() -> None:
    """Let the C library keep freed blocks of up to 32 MB for reuse, for the rest of the process.

    The process then holds up to 256 MB of freed memory instead of returning it (setting either threshold
    also turns off glibc's adaptive ones). Linux only; a no-op where the C library has no `mallopt` (not
    glibc).
    """
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None) if sys.platform.startswith("linux") else None
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        mallopt(_M_TRIM_THRESHOLD, 256 << 20)
