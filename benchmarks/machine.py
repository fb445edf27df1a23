"""What a benchmark ran on, as its results record it (one string, the same fields in every script)."""

from __future__ import annotations

import os
import platform

import torch


def describe(*extra: str) -> str:
    """``"x86_64, 2 cores, 2 threads, Python 3.11.7, torch 2.13.0+cpu"`` then ``extra`` (the allocator,
    say), comma-separated. Threads are torch's intra-op threads at the time of the call."""
    fields = [platform.machine(), f"{os.cpu_count()} cores", f"{torch.get_num_threads()} threads",
              f"Python {platform.python_version()}", f"torch {torch.__version__}", *extra]
    return ", ".join(fields)
