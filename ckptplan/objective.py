"""What a plan minimises: the one choice the solver, the planner, the plan file and the server share."""

from __future__ import annotations

from enum import Enum


class Objective(str, Enum):
    """What the plan minimises. Time is the default: FLOPs call a recomputed GELU or LayerNorm free.

    Formats as its value (``f"{Objective.TIME}"`` is ``"time"``), as the plain string it replaces did."""

    TIME = "time"  # estimated recompute time (costmodel.py)
    FLOPS = "flops"  # recomputed FLOPs first, then estimated time among the plans with that many

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


__all__ = ["Objective"]
