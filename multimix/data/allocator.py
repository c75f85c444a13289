"""glibc ``malloc`` settings for processes that allocate and free large image batches.

Every augmentation call returns fresh ``uint8 (N, H, W)`` arrays (4 MB per view for 64 images at
256²) and the pipeline frees them once Ray has copied the block. With glibc's defaults such
blocks are either ``mmap``-ed or trimmed from the top of the heap when freed, so the next call
page-faults the same amount of memory in again. On virtual machines a first touch is expensive:
on the 2-core development VM it was ~40 % of the fast augmentation's CPU time at 256²
(``multimix bench data --no-malloc-tuning`` shows it), and about 21 faults per weak+strong pair.

:func:`keep_freed_memory` raises the mmap threshold to glibc's maximum (32 MB) and the trim
threshold to 512 MB, so freed batch memory stays mapped and is reused. Cost: a process may keep
up to ~512 MB of freed memory instead of returning it to the OS. It is applied once per process
in the Ray Data map tasks and by ``multimix bench data``; ``MULTIMIX_MALLOC_TUNING=0`` disables
it. Elsewhere (musl, macOS, Windows) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_freed_memory"]

MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 512 << 20
_M_TRIM_THRESHOLD = -1  # <malloc.h>
_M_MMAP_THRESHOLD = -3

_state: dict = {}


def keep_freed_memory() -> bool:
    """Apply the settings above to this process (once); True when glibc accepted them.

    Returns False (and changes nothing) when ``MULTIMIX_MALLOC_TUNING=0`` or there is no glibc
    ``mallopt``.
    """
    if "applied" in _state:
        return _state["applied"]
    ok = False
    if os.environ.get("MULTIMIX_MALLOC_TUNING", "1").strip().lower() not in ("0", "false", "no"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
                mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
        except (OSError, AttributeError):
            ok = False
    _state["applied"] = ok
    return ok
