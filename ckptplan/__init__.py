"""ckptplan: plan activation checkpointing for PyTorch training under a memory budget.

    graph = ckptplan.trace(model, *example_args)
    plan = ckptplan.solve(graph, budget="8GB")
    plan.save("plans/model.yaml")
    handle = ckptplan.apply(model, ckptplan.load_plan("plans/model.yaml"))

or in one call: ``handle = ckptplan.auto(model, *example_args, budget="8GB")``.
"""

from . import _compat  # noqa: F401  imported first for its check: it names any torch internal this torch lacks
from ._version import __version__ as __version__  # re-exported
from .auto import auto
from .errors import (
    BudgetError,
    CkptplanError,
    InfeasibleBudget,
    InputError,
    OutputError,
    PlanMismatch,
    SolverTimeout,
)
from .graph import Graph
from .plan import Decision, Plan, load_plan
from .planner import check_plan, solve
from .runtime import Handle, StepStats, apply
from .trace import trace
from .units import format_bytes, parse_budget

__all__ = [
    "BudgetError", "CkptplanError", "check_plan", "Decision", "Graph", "Handle", "InfeasibleBudget", "InputError",
    "OutputError",
    "Plan", "PlanMismatch", "SolverTimeout", "StepStats", "apply", "auto", "format_bytes", "load_plan",
    "parse_budget", "solve", "trace",
]
