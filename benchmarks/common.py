"""What the benchmark scripts share: the machine a run records, a steady allocator, an earlier run read
back, and Spearman's rank correlation.

Scripts import it as ``common`` with ``benchmarks/`` on ``sys.path`` (the calibration scripts add it too).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import math
import os
import platform
import statistics
from pathlib import Path
from typing import Any, Callable

import torch


# ---- the machine -----------------------------------------------------------------------------------
def describe(*extra: str) -> str:
    """What a benchmark ran on, as its results record it: ``"x86_64, 2 cores, 2 threads, Python 3.11.7,
    torch 2.13.0+cpu"`` then ``extra`` (the allocator, say), comma-separated. Threads are torch's intra-op
    threads at the time of the call."""
    fields = [
        platform.machine(),
        f"{os.cpu_count()} cores",
        f"{torch.get_num_threads()} threads",
        f"Python {platform.python_version()}",
        f"torch {torch.__version__}",
        *extra,
    ]
    return ", ".join(fields)


# ---- the allocator ---------------------------------------------------------------------------------
# NOTE [ Steady allocator ]
# Keep a benchmark's freed memory in the process, as a GPU's caching allocator does. glibc returns freed
# memory to the kernel: blocks above the mmap threshold are unmapped when freed, and the top of the heap
# is trimmed. The next step's tensors then page-fault their memory in again. On the 2-core benchmark
# machine a U-Net step (22 ms of work) took 6,000 faults and 10-15 ms more in some steps and none in
# others, depending on what the heap held: timing noise, and a bias that moves with each configuration's
# memory pattern. With mmap off and trimming at 1 GiB, a step after the first faults nothing, and what is
# timed is the step's work.
_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_MAX = -4


def steady_allocator() -> str:
    """Turn glibc's trimming and mmap off for this process (NOTE [ Steady allocator ]); says what was done
    (for the results' record)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
    except (OSError, AttributeError):  # not glibc (macOS, musl): the system's allocator as it is
        ok = False
    return "glibc mallopt: M_MMAP_MAX=0, M_TRIM_THRESHOLD=1GiB" if ok else "system allocator (not glibc)"


# ---- an earlier run --------------------------------------------------------------------------------
def load_again(path: str, option: str, script: str, verb: str, redo: Callable[[list[dict]], None]) -> dict[str, Any]:
    """An earlier benchmark run read back to be counted or priced again by the present code (``--refit``,
    ``--reprice``): the JSON ``script`` wrote at ``path``, its measurements kept, with ``redo`` applied to
    its ``results`` in place; a SystemExit naming the file and the option when this code cannot redo it."""
    name = script.removesuffix(".py") + ".json"
    try:
        run = json.loads(Path(path).read_text())
        redo(run["results"])
        return run
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        raise SystemExit(
            f"{option} {path}: this code cannot {verb} it again ({type(e).__name__}: {e}); "
            f"give it the {name} a run of {script} wrote"
        ) from None


# ---- statistics ------------------------------------------------------------------------------------
def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation of two equal-length lists (ties share their mean rank); 0 when either
    is constant."""

    def ranks(x: list[float]) -> list[float]:
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for t in range(i, j + 1):
                r[order[t]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.mean(ra), statistics.mean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    sd = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / sd if sd else 0.0
