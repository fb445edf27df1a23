"""ckptplan: plan activation checkpointing for PyTorch training under a memory budget.

    graph = ckptplan.trace(model, *example_args)
    plan = ckptplan.solve(graph, budget="8GB")
    plan.save("plans/model.yaml")
    handle = ckptplan.apply(model, ckptplan.load_plan("plans/model.yaml"))

or in one call: ``handle = ckptplan.auto(model, *example_args, budget="8GB")``.
"""

__version__ = "0.1.0"

from . import _compat  # noqa: E402,F401  first: names any torch internal this torch lacks
from .auto import auto
from .errors import (  # noqa: E402
    BudgetError,
    CkptplanError,
    InfeasibleBudget,
    InputError,
    OutputError,
    PlanMismatch,
    SolverTimeout,
)
from .graph import Graph  # noqa: E402
from .plan import Decision, Plan, load_plan  # noqa: E402
from .planner import check_plan, solve  # noqa: E402
from .runtime import Handle, StepStats, apply  # noqa: E402
from .trace import trace  # noqa: E402
from .units import format_bytes, parse_budget  # noqa: E402

__all__ = [
    "BudgetError", "CkptplanError", "check_plan", "Decision", "Graph", "Handle", "InfeasibleBudget", "InputError",
    "OutputError",
    "Plan", "PlanMismatch", "SolverTimeout", "StepStats", "apply", "auto", "format_bytes", "load_plan",
    "parse_budget", "solve", "trace",
]
