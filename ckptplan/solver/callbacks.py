"""What runs at each improving CP-SAT solution: progress reports and bound.py's knapsack proof of the gap."""

from __future__ import annotations

import math
import time
from typing import Callable

from ortools.sat.python import cp_model

from . import bound
from .formulation import Formulation

BOUND_ROWS = 3  # the memory rows tightest under a solution that bound.py solves exactly


class Progress(cp_model.CpSolverSolutionCallback):
    """At each improving solution: asks ``check`` (when given) for a bound found outside CP-SAT and whether
    it proves the solution within the gap, then stops the search; reports (objective, best bound). With
    the same model and limits the same solutions arrive in the same order, so this stays deterministic."""

    def __init__(
        self,
        report: Callable[[float, float], None] | None,
        check: Callable[[cp_model.CpSolverSolutionCallback], tuple[int, bool]] | None,
    ) -> None:
        super().__init__()
        self.report, self.check = report, check

    def on_solution_callback(self) -> None:
        lower, proven = self.check(self) if self.check is not None else (0, False)
        if self.report is not None:
            self.report(self.objective_value, max(self.best_objective_bound, lower))
        if proven:
            self.stop_search()


class KnapsackCheck:
    """bound.py's knapsack bound on the ``BOUND_ROWS`` memory rows tightest under a solution (each row
    solved once, a solution checked when it improves on the last one checked by half the gap). When they
    fall short of the gap, the best of them once more at bound.py's finer resolution.

    No row is solved after ``deadline`` (``time.monotonic()``; the search's wall-clock limit): CP-SAT
    cannot stop while a callback runs, and a row of the 7B model takes 0.5 s (the finer pass 1.2 s, on
    the 2-core machine, idle), so checks begun near the limit, and the final solution's check after it,
    added their time to the limit; a row still being solved when it passes stops there and bounds
    nothing. Rows solved before it still count. A search cut on the deterministic
    clock ends before the deadline, and its checks are unchanged, so its plan stays byte-identical."""

    def __init__(
        self, model: Formulation, capacity: int, gap_limit: float, known: int = 0, deadline: float = math.inf
    ) -> None:
        self.model, self.capacity, self.gap, self.deadline = model, capacity, gap_limit, deadline
        self.cost = model.cost_form
        self.rows: dict[tuple[int, int], int] = {}  # (row, buckets) -> its bound
        self.known = known  # the best bound so far: valid for every solution
        self.checked: int | None = None  # cost of the last solution checked

    def __call__(self, solution: cp_model.CpSolverSolutionCallback | cp_model.CpSolver) -> tuple[int, bool]:
        model = self.model
        value = int(solution.value(model.cost))
        if self.checked is None or value < self.checked * (1 - self.gap / 2):
            self.checked = value
            slack = sorted(
                (self.capacity - base - (e if isinstance(e, int) else solution.value(e)), i)
                for i, (base, e, ub) in enumerate(model.row_exprs)
                if ub > self.capacity
            )
            for _, i in slack[:BOUND_ROWS]:
                self._bound(i, bound.BUCKETS, value)
            solved = [i for _, i in slack[:BOUND_ROWS] if (i, bound.BUCKETS) in self.rows]
            # the finer pass costs ~10x the first: only when the first nearly proves the gap
            if solved and value - self.known <= max(4 * self.gap, 0.02) * value:
                self._bound(max(solved, key=lambda i: self.rows[(i, bound.BUCKETS)]), bound.FINE_BUCKETS, value)
        return self.known, value - self.known <= self.gap * value

    def _bound(self, row: int, buckets: int, value: int) -> None:
        if value - self.known <= self.gap * value:
            return  # proven already
        if (row, buckets) not in self.rows:
            if time.monotonic() >= self.deadline:
                return  # the search's time is up: no new row (see the class)
            found = bound.lower_bound(
                self.model.regions,
                self.model.row_form(row),
                self.capacity,
                self.cost,
                buckets=buckets,
                deadline=self.deadline,
            )
            self.rows[(row, buckets)] = found or 0
        self.known = max(self.known, min(self.rows[(row, buckets)], value))  # never above a solution
