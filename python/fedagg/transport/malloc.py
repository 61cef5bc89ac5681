"""glibc's allocator, set for streaming large messages.

libzmq allocates every received message of 1-4 MiB with malloc() in its I/O
thread, and the application frees it a moment later. With glibc's defaults the
heap top is given back to the kernel (trimmed) as soon as 8 MiB are free, and
the next messages fault the same pages in again, zero-filled: on a 400 MB
upload that is ~25,000 page faults, a quarter of the receiver's CPU time
(bench/RESULTS.md). Keeping 64 MiB of freed heap per arena, and serving blocks
below 32 MiB from the heap rather than from fresh mmap()s, removes them.

It changes the process's allocator, so it is done once, logged, and skipped
when the user set glibc's malloc options through the environment.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger("fedagg.transport")

M_TRIM_THRESHOLD = -1  # glibc's mallopt() parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD = 64 << 20
MMAP_THRESHOLD = 32 << 20  # glibc's largest accepted value on 64-bit

_done = None


def keep_freed_memory() -> bool:
    """Set glibc's trim and mmap thresholds once per process; True if they are set."""
    global _done
    if _done is None:
        _done = _apply()
    return _done


def _apply() -> bool:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(k in os.environ for k in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")) or \
            "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        log.debug("malloc options come from the environment: left as they are")
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # The mmap threshold first: setting either one freezes glibc's adaptive thresholds.
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    log.debug("glibc malloc: trim threshold %d, mmap threshold %d (%s)", TRIM_THRESHOLD, MMAP_THRESHOLD,
              "set" if ok else "refused")
    return ok
