"""Keep a benchmark's freed memory in the process, as a GPU's caching allocator does.

glibc returns freed memory to the kernel: blocks above the mmap threshold are unmapped when freed, and
the top of the heap is trimmed. The next step's tensors then page-fault their memory in again. On the
2-core benchmark machine a U-Net step (22 ms of work) took 6,000 faults and 10-15 ms more in some steps
and none in others, depending on what the heap held: timing noise, and a bias that moves with each
configuration's memory pattern. With mmap off and trimming at 1 GiB, a step after the first faults
nothing, and what is timed is the step's work.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_MAX = -4


def steady_allocator() -> str:
    """Turn glibc's trimming and mmap off for this process; says what was done (for the results' record)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
    except (OSError, AttributeError):  # not glibc (macOS, musl): the system's allocator as it is
        ok = False
    return "glibc mallopt: M_MMAP_MAX=0, M_TRIM_THRESHOLD=1GiB" if ok else "system allocator (not glibc)"
