"""glibc malloc settings for processes that train networks on the CPU.

PyTorch's CPU tensors come from ``malloc``. By default glibc serves a block of at least its
mmap threshold (which it adjusts, up to 32 MB) with fresh pages and hands freed memory back
to the OS, so every step of a supernet faults its large activation tensors in again, a
sizeable share of a step's time (more of the fast supernet's than of the plain one's). With
:data:`MALLOC_ENV`, freed memory stays in the process for the next step, which then faults
almost no pages in; resident memory stays at its peak until the process ends. The page-fault
counts and timings are in ``benchmarks/README.md`` (``benchmarks/supernet_speed.py --malloc``).

No torch import here: the runner, which only starts kernels, reads this too.
"""
from __future__ import annotations

import ctypes
import platform

__all__ = ["MALLOC_ENV", "keep_freed_memory"]

#: the settings as environment variables, which glibc reads when a process starts (the runner
#: starts its notebook kernels with them)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3   # malloc.h


def keep_freed_memory() -> bool:
    """Apply :data:`MALLOC_ENV` to this running process through glibc's ``mallopt``; False
    (nothing done) where the C library is not glibc."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"]))
                and libc.mallopt(_M_TRIM_THRESHOLD, int(MALLOC_ENV["MALLOC_TRIM_THRESHOLD_"])))
