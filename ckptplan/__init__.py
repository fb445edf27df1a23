"""ckptplan: plan activation checkpointing for PyTorch training under a memory budget.

    graph = ckptplan.trace(model, *example_args)
    plan = ckptplan.solve(graph, budget="8GB")
    plan.save("plans/model.yaml")
    handle = ckptplan.apply(model, ckptplan.load_plan("plans/model.yaml"))

or in one call: ``handle = ckptplan.auto(model, *example_args, budget="8GB")``.

NOTE [ Lazy package ]: ``import ckptplan`` imports neither torch nor OR-Tools, so the CLI's ``--help``
answers at once. The errors and units are bound here; every other public name is imported on first use,
through ``_compat``, which checks every torch internal ckptplan uses and names all that this torch lacks.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any

from ._version import __version__ as __version__  # re-exported
from .errors import (
    BudgetError,
    CkptplanError,
    InfeasibleBudget,
    InputError,
    OutputError,
    PlanMismatch,
    SolverTimeout,
)
from .units import format_bytes, parse_budget

# public name -> the submodule that defines it, imported on first use
_LAZY = {
    "auto": ".auto",
    "Graph": ".graph",
    "Decision": ".plan",
    "Plan": ".plan",
    "load_plan": ".plan",
    "check_plan": ".decisions",
    "solve": ".planner",
    "Handle": ".runtime",
    "StepStats": ".runtime",
    "apply": ".runtime",
    "trace": ".trace",
}

__all__ = [
    "BudgetError",
    "CkptplanError",
    "check_plan",
    "Decision",
    "Graph",
    "Handle",
    "InfeasibleBudget",
    "InputError",
    "OutputError",
    "Plan",
    "PlanMismatch",
    "SolverTimeout",
    "StepStats",
    "apply",
    "auto",
    "format_bytes",
    "load_plan",
    "parse_budget",
    "solve",
    "trace",
]


def __getattr__(name: str) -> Any:
    where = _LAZY.get(name)
    if where is None:  # a submodule (ckptplan.plan), as after the eager imports this package once made
        # (also what `from . import report` asks first; importing it is the answer)
        if name.startswith("__") or importlib.util.find_spec(f"{__name__}.{name}") is None:
            raise AttributeError(f"module 'ckptplan' has no attribute {name!r}")
        return importlib.import_module(f"{__name__}.{name}")
    importlib.import_module(f"{__name__}._compat")  # first: names any torch internal this torch lacks
    value = getattr(importlib.import_module(where, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """``ckptplan.trace`` and ``ckptplan.auto`` are functions, as when this package bound them eagerly:
    importing the submodules of the same names must not rebind the package's attributes to the modules."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("trace", "auto") and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
