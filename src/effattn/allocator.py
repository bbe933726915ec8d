"""Opt-in: ask glibc's malloc to keep freed memory instead of handing it back to the system.

A fresh multi-MB tensor on the CPU is page-faulted in on first touch (0.2-0.3 ms a MB on
the 2-core VM the performance figures come from).  glibc serves large blocks with ``mmap``
(returned to the system when freed) and trims free memory at the top of its heap past a
threshold, so a training step's fresh outputs and gradients (tens of MB) are faulted in
again on every step, and whether they are depends on the heap's layout at that moment:
Nystromformer's training step at N = 16,384 (B=1, H=4, D=64) took 50-52 ms when no page
faulted and 66-71 ms when 48-80 MB did, call by call in one process; with
:func:`retain_freed_memory` every call took 49-52 ms (longformer: 236-242 ms instead of
~245-255).  The setting is process-wide (every library's allocations, ours or not), so
effattn never applies it on its own: call it once at start-up, or set glibc's
``GLIBC_TUNABLES`` (``glibc.malloc.trim_threshold``, ``glibc.malloc.mmap_threshold``)
before the process starts.  ``effattn bench --retain-freed-memory`` applies it in every
case's process, ours and the peers' alike.
"""

from __future__ import annotations

import ctypes
import functools
import sys

__all__ = ["retain_freed_memory", "release_free_heap", "MMAP_THRESHOLD_MAX"]

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
#: the largest ``mmap_threshold`` glibc accepts on 64-bit systems (``HEAP_MAX_SIZE / 2``)
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024


@functools.lru_cache(maxsize=None)
def _glibc():
    """The process's C library when it is glibc (has ``gnu_get_libc_version``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version
        return libc
    except (OSError, AttributeError):
        return None


def retain_freed_memory(trim_threshold: int = 1 << 30,
                        mmap_threshold: int = MMAP_THRESHOLD_MAX) -> bool:
    """Make glibc keep up to ``trim_threshold`` bytes of freed memory at the top of its heap
    and serve blocks up to ``mmap_threshold`` bytes from the heap (reused without page
    faults) instead of fresh ``mmap`` pages; process-wide, for the rest of the process.

    Returns True when applied, False where the C library is not glibc (nothing changed).
    Raises ValueError for a negative threshold or ``mmap_threshold`` above
    :data:`MMAP_THRESHOLD_MAX`, which glibc rejects."""
    for name, value in (("trim_threshold", trim_threshold), ("mmap_threshold", mmap_threshold)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}: expected a non-negative int of bytes, got {value!r}")
    if mmap_threshold > MMAP_THRESHOLD_MAX:
        raise ValueError(f"mmap_threshold: glibc accepts at most {MMAP_THRESHOLD_MAX} bytes "
                         f"(32 MiB), got {mmap_threshold}")
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    trim = min(trim_threshold, 2**31 - 1)  # mallopt takes an int
    return (libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
            and libc.mallopt(_M_TRIM_THRESHOLD, trim) == 1)


def release_free_heap() -> bool:
    """Hand the memory malloc keeps after ``free`` back to the system now (glibc
    ``malloc_trim(0)``), whatever the thresholds; False where the C library is not glibc."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
