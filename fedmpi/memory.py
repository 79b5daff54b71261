"""Keep freed memory in the process, so that training steps stop page-faulting their buffers back in.

glibc's malloc hands large freed blocks back to the kernel: blocks above a threshold that it adapts at
run time are mmapped and unmapped, and the heap's free top is trimmed past another. A training step frees
and reallocates the same activation and gradient buffers every step, so with the defaults a step may
fault tens of megabytes back in, depending on the process's allocation history: on this project's CPU VM
(40x48x40 volumes, width 0.25, batch 4, one thread) 6,000-8,000 minor faults and 10-15 ms of kernel time
in a 70 ms step, in the learners more often than in a bare training loop; none once both thresholds are
fixed high. The process then keeps its peak heap, which the next step needs again anyway.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
KEEP = 1 << 30  # blocks below this come from the heap; this much free heap top is kept
FALLBACK_MMAP = 32 << 20  # the largest mmap threshold older glibc versions accept
# The user's own allocator settings win: glibc's environment variables, or another malloc preloaded.
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds high for this process; False (nothing changed) off glibc or
    where the user set the allocator up (MALLOC_* variables, glibc.malloc tunables, LD_PRELOAD)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(os.environ.get(k) for k in USER_SETTINGS) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    if "malloc" in os.environ.get("LD_PRELOAD", ""):  # jemalloc, tcmalloc, mimalloc: glibc's malloc is unused
        return False
    mallopt = ctypes.CDLL(None).mallopt
    if not (mallopt(M_MMAP_THRESHOLD, KEEP) or mallopt(M_MMAP_THRESHOLD, FALLBACK_MMAP)):
        return False
    return bool(mallopt(M_TRIM_THRESHOLD, KEEP))
