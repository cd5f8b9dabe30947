"""Keep freed heap memory inside a CPU training process (glibc), so per-step temporaries do not fault in again.

Why (issue 15, measured with `ru_minflt` on the bench's resnet20 → resnet8 step, batch 128): a KD
step caused no page faults, a DSKD step ~14,000 (≈ 55 MB faulted in per step, most of it in the
DDIM chain and L_diff). glibc's default malloc returns the top of the heap to the kernel once more
than twice its (self-tuned) mmap threshold is free, and the many 0.25–2 MB temporaries of the
denoiser's calls cross that line every step: each new tensor then faults in fresh zeroed pages,
which cost more CPU than the denoiser's arithmetic. Fixing both thresholds (mallopt) keeps the
freed memory for reuse: the step then faults ~0 pages. The price is resident memory that does not
shrink back after the peak, which a training process reaches every step anyway.

Best effort: only on glibc, and never when the user chose their own malloc settings (MALLOC_*_ or
GLIBC_TUNABLES in the environment); any failure leaves malloc as it was.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = 256 << 20  # keep up to this much free memory at the top of the heap
USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")

_state: dict[str, bool | None] = {"applied": None}


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds once per process; True when they are set (now or before)."""
    if _state["applied"] is None:
        _state["applied"] = _apply()
    return bool(_state["applied"])


def _apply() -> bool:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in USER_SETTINGS):
        return False  # the user tuned malloc themselves: leave it alone
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mmap first: setting either turns glibc's self-tuning off, and the trim threshold must then be set too
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
