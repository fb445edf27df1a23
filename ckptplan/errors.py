"""Typed errors. Each message says what to do next; each class maps to a CLI exit code."""

from __future__ import annotations


class CkptplanError(Exception):
    """Base class for every error ckptplan raises on purpose."""

    exit_code = 1


class BudgetError(CkptplanError, ValueError):
    """A budget string or number that cannot be parsed."""

    exit_code = 2


class InputError(CkptplanError, ValueError):
    """Bad user input other than a budget: a model spec, a plan file, an option."""

    exit_code = 2


class InfeasibleBudget(CkptplanError):
    """The budget is below the lowest peak any plan can reach.

    ``minimum_bytes`` is the smallest budget known to fit a plan. ``minimum_proven``: the solver proved
    no plan peaks lower; when False it is an upper bound on the minimum (the lowest peak of the plans the
    search checked before its time limit), and ``minimum_source`` says which plan reached it.
    ``minimum_lower_bytes``: a proven lower bound on every plan's peak (0: none known); above the budget,
    it proves the budget infeasible even when the minimum itself is not proven.
    """

    exit_code = 3

    def __init__(
        self,
        message: str,
        *,
        budget_bytes: int,
        minimum_bytes: int,
        minimum_proven: bool = True,
        minimum_source: str = "minimum-peak search",
        minimum_lower_bytes: int = 0,
    ) -> None:
        super().__init__(message)
        self.minimum_lower_bytes = minimum_lower_bytes
        self.budget_bytes = budget_bytes
        self.minimum_bytes = minimum_bytes
        self.minimum_proven = minimum_proven
        self.minimum_source = minimum_source


class SolverTimeout(CkptplanError):
    """The time limit ran out before the solver found any plan that fits."""

    exit_code = 4


class PlanMismatch(CkptplanError):
    """A plan does not match the model or inputs it is applied to."""

    exit_code = 5


class OutputError(CkptplanError):
    """An output file cannot be written: the path is a directory or under a file, not writable, or the disk
    is full."""

    exit_code = 7
