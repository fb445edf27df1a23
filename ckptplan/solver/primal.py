"""A first plan without search: the knapsack's cheapest configuration of the binding row, repaired.

On deep models CP-SAT spends most of its time in its root LP before its first good plan (Llama-7B shape,
64 layers: 6.7 s to a first solution, 9 s to a good one), growing faster than the depth. bound.py
already solves one memory row exactly, folding identical layers; its argmin is a plan. Three things
keep that plan from fitting the whole model, each handled here:

* the row's bytes were rounded down: the plan can overshoot its own row by a few buckets. The row's
  capacity is lowered by the overshoot and the row solved again;
* identical layers look the same to the row but not to the rest of the model: the row cannot tell
  which layer gets which configuration, though the position matters (a layer recomputed early in
  backward sits on top of everything saved before it). Configurations are dealt to identical layers
  by their steady bytes, the lightest first, the order that minimises the highest prefix when a
  configuration that saves less needs more room for its own recomputation (an exchange argument);
  and the order given by the knapsack is kept when it overshoots less;
* other rows are not in the knapsack: when one of them overshoots, it becomes the row solved; when
  two rows each overshoot the other's plan, their weighted sum is solved (a surrogate constraint:
  every plan that fits both fits it), the weight bisected until a plan fits both.

The first row solved is the tightest with nothing checkpointed (the top of the step's memory, in
practice the binding one on a chain). Every row is checked in the model's exact terms
(``Formulation.evaluate``): a plan returned here is a solution of the CP-SAT model. The bound of each row
(or weighted sum) solved at the full capacity is a valid lower bound on the cost, returned with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from ..graph import Graph
from . import bound
from .families import families
from .linear import LinearForm
from .regions import Region
from .rows import Evaluation


class _Model(Protocol):
    """What the first plan reads of the CP-SAT model (formulation.py's ``Formulation``; cpsat.py, which
    searches it, calls primal.py, so primal.py never imports cpsat.py)."""

    graphs: list[Graph]
    regions: tuple[Region, ...]
    cost_form: LinearForm
    row_exprs: list

    def row_form(self, index: int) -> LinearForm: ...

    def evaluate(self, saved: dict[int, frozenset[int]]) -> Evaluation: ...


MAX_ROUNDS = 8  # rows solved at the coarse resolution before giving up (~0.3 s each, 64-layer 7B shape)
FINE_ROUNDS = 3  # the same at the fine resolution (~1 s each there)
FINE_COST = 5  # a fine round computes about this many times the cells of a coarse one (measured 4-5x)
REPAIRS = 4  # greedy repairs of a plan that overshoots by rounding, before solving a row again
MIX_WEIGHT = 64  # two fighting rows are mixed as (64 - w) * a + w * b, w bisected: 6 rows solved at most


@dataclass(frozen=True, slots=True)
class FirstPlan:
    saved: dict[int, frozenset[int]] | None  # checkpointed region (index) -> ops it saves; None: none found
    cost: int  # estimated recompute time (ns), in the model's terms
    bound: int  # a valid lower bound on every plan's cost (0 when no row was solved at full capacity)
    rounds: int  # rows solved
    work: int  # table cells computed (bound.RowSolution.work): what the search is charged


def first_plan(
    model: _Model, capacity: int, *, gap: float = 0.0, work_limit: int | None = None, deadline: float = math.inf
) -> FirstPlan:
    """A plan whose every row fits ``capacity`` (model units); ``saved`` is None when none was found
    (deep nesting, several rows binding together: CP-SAT's search finds one).

    Rows are solved at bound.py's coarse resolution; when that plan is not proven within ``gap`` by the
    bounds found on the way, the search runs again at the fine one (a tighter bound, a plan that loses
    less to rounding). No round starts that would take the work past ``work_limit`` (cells, predicted
    from the rounds before): the result depends on the model and the limits only, never on the clock.

    ``deadline`` (``bound.clock()``'s time) is the wall-clock backstop: once it passes, the row being
    solved stops (bound.py reads the clock inside it), no other starts, and the best plan found so far is
    returned. A search that ends before it is unchanged by it."""
    search = _Search(model, capacity, gap, work_limit, deadline)
    binding = [i for i, (_, _, ub) in enumerate(model.row_exprs) if ub > capacity]
    if binding:
        row = search.run(max(binding, key=lambda i: (model.row_exprs[i][0], -i)), bound.BUCKETS, MAX_ROUNDS)
        if not search.proven():
            search.run(row, bound.FINE_BUCKETS, FINE_ROUNDS)
    best = search.best
    return FirstPlan(
        saved=best[1] if best else None,
        cost=best[0] if best else 0,
        bound=min(search.lower, best[0]) if best else search.lower,
        rounds=search.rounds,
        work=search.work,
    )


class _Search:
    """Rows solved one after another; the cheapest plan that fits, and the best bound, so far."""

    def __init__(
        self, model: _Model, capacity: int, gap: float, work_limit: int | None, deadline: float = math.inf
    ) -> None:
        self.model, self.capacity, self.gap, self.limit = model, capacity, gap, work_limit
        self.deadline = deadline
        self.classes = _classes(model)
        self.best: tuple[int, dict[int, frozenset[int]]] | None = None  # (cost, decisions)
        self.lower = 0  # the best bound of a row solved at the full capacity
        self.rounds = self.work = 0
        self.last: dict[int, int] = {}  # buckets -> cells of the last round at that resolution

    def proven(self) -> bool:
        return self.best is not None and self.best[0] - self.lower <= self.gap * self.best[0]

    def run(self, row: int, buckets: int, limit: int) -> int:
        """Solve rows from ``row`` until a plan fits as the knapsack gave it, one is proven within the gap,
        or ``limit`` rows or the work limit are reached; returns the last row solved."""
        shrunk: dict[int, tuple[int, int]] = {}  # row -> (capacity it is solved at, times lowered)
        solved: set[int] = set()
        for _ in range(limit):
            cap, _ = shrunk.get(row, (self.capacity, 0))
            result = self._solve(self.model.row_form(row), cap, buckets, bounds=cap == self.capacity)
            if result is None:
                break
            fits, worst, over = result
            if fits or self.proven():
                break
            solved.add(row)
            if worst in solved and worst != row and cap == self.capacity and worst not in shrunk:
                if self._mix(row, worst, buckets) or self.proven():  # two rows fight: both at once
                    break
            # the row's own rounding, or the rows still fight: solve the worst row with less room, less
            # each time
            if worst in solved:
                cap, times = shrunk.get(worst, (self.capacity, 0))
                shrunk[worst] = (cap - over * 2**times, times + 1)
            row = worst
        return row

    def _mix(self, a: int, b: int, buckets: int) -> bool:
        """Rows ``a`` and ``b`` each overshoot the other's plan: solve their weighted sum (a surrogate
        constraint: every plan that fits both fits it, so its knapsack is a valid bound too), bisecting
        b's weight toward the row the last plan overshot, then giving the sum less room as ``run`` does
        for one row. Whether a plan fitted."""
        form_a, form_b = self.model.row_form(a), self.model.row_form(b)
        lo, hi = 0, MIX_WEIGHT  # b's weight: at lo the plan overshoots b, at hi it overshoots a
        over_lo = None  # how much the plan at lo overshoots b
        while hi - lo > 1:
            w = (lo + hi) // 2
            result = self._solve(
                _weighted(form_a, MIX_WEIGHT - w, form_b, w), MIX_WEIGHT * self.capacity, buckets, bounds=True
            )
            if result is None or result[0]:
                return result is not None  # fitted, or out of work
            _, worst, over = result
            if worst == a:
                hi = w
            elif worst == b:
                lo, over_lo = w, over
            else:
                return False  # a third row: back to one row at a time
        if over_lo is None:
            return False
        form, cap = _weighted(form_a, MIX_WEIGHT - lo, form_b, lo), MIX_WEIGHT * self.capacity
        for times in range(FINE_ROUNDS):
            cap -= lo * over_lo * 2**times
            result = self._solve(form, cap, buckets)
            if result is None or result[0]:
                return result is not None
            if result[1] == b:
                over_lo = result[2]
        return False

    def _solve(self, form: LinearForm, cap: int, buckets: int, *, bounds: bool = False) -> tuple[bool, int, int] | None:
        """One knapsack and its plan tried (``_try``'s result); None when the work limit forbids it (its
        cells predicted by the last round at that resolution), the deadline has passed or passes during it,
        or nothing fits the form. ``bounds``: ``cap`` is the form's full capacity, so the knapsack's bound
        holds for the model."""
        predicted = self.last.get(buckets, FINE_COST * self.last.get(bound.BUCKETS, 0))
        if self.limit is not None and self.work + predicted > self.limit:
            return None
        if self.deadline != math.inf and bound.clock() >= self.deadline:
            return None
        found = bound.solve_row(
            self.model.regions, form, cap, self.model.cost_form, buckets=buckets, plan=True, deadline=self.deadline
        )
        self.rounds += 1
        if found is None or found.saved is None:
            return None
        self.work += found.work
        self.last[buckets] = found.work
        if bounds:
            self.lower = max(self.lower, found.bound)
        return self._try(found.saved)

    def _try(self, saved: dict[int, frozenset[int]]) -> tuple[bool, int, int]:
        """Deal the knapsack's plan, and keep it when it fits every row; otherwise keep its repair when that
        fits. Returns whether it fitted as given, and the most overshooting row and by how much."""
        given = self.model.evaluate(saved)
        dealt = _deal(self.model, self.classes, saved, given.steady)
        tried = []
        for plan, ev in ((dealt, self.model.evaluate(dealt)), (saved, given)):
            over = ev.rows[ev.worst] - self.capacity
            if over <= 0:
                self._keep(ev.cost, plan)
                return True, -1, 0
            tried.append((over, plan, ev))
        over, plan, ev = min(tried, key=lambda t: t[0])
        fixed, fixed_ev = _repair(self.model, plan, ev, self.capacity)
        if max(fixed_ev.rows) <= self.capacity:
            self._keep(fixed_ev.cost, fixed)
        return False, ev.worst, over

    def _keep(self, cost: int, saved: dict[int, frozenset[int]]) -> None:
        if self.best is None or cost < self.best[0]:
            self.best = (cost, saved)


def _weighted(a: LinearForm, wa: int, b: LinearForm, wb: int) -> LinearForm:
    """wa * a + wb * b."""

    def add(x: dict, y: dict) -> dict:
        return {key: wa * x.get(key, 0) + wb * y.get(key, 0) for key in sorted({*x, *y})}

    return LinearForm(
        c=add(a.c, b.c), k=add(a.k, b.k), z=add(a.z, b.z), s=add(a.s, b.s), constant=wa * a.constant + wb * b.constant
    )


def _repair(
    model: _Model, saved: dict[int, frozenset[int]], ev: Evaluation, capacity: int
) -> tuple[dict[int, frozenset[int]], Evaluation]:
    """Stop caching ops until the overshooting row fits: the cheaper of the one op that frees enough at the
    least recompute time, and the ops that cost least per unit freed, taken in that order (a few times, as
    the peak may move). Quick, but a cached activation can be far more than the overshoot: solving the
    row again with less room often does better."""
    for _ in range(REPAIRS):
        worst = ev.worst
        over = ev.rows[worst] - capacity
        if over <= 0:
            break
        form = model.row_form(worst)
        # (recompute time it adds, units it frees, region, op) for every cached op that weighs on the row
        items = sorted(
            (-model.cost_form.k.get((j, p), 0), form.k[(j, p)], j, p)
            for j, ops in saved.items()
            for p in sorted(ops)
            if form.k.get((j, p), 0) > 0
        )
        if not items:
            break
        greedy, freed, added = [], 0, 0
        for cost, units, j, p in sorted(items, key=lambda t: (t[0] / t[1], t[2], t[3])):
            if freed >= over:
                break
            greedy.append((j, p))
            freed, added = freed + units, added + cost
        single = min((t for t in items if t[1] >= over), default=None)
        drop = [single[2:]] if single is not None and single[0] <= added else greedy
        saved = {j: ops - {p for i, p in drop if i == j} for j, ops in saved.items()}
        ev = model.evaluate(saved)
    return saved, ev


def _classes(model: _Model) -> list[list[tuple[int, list[int]]]]:
    """Families (outermost region and the regions nested in it) that are the same layer: same ops, same
    nested regions at the same offsets with the same ops free to be saved (an op written in place by a
    later layer is not). A configuration moves between them by offset."""
    graph, regions = model.graphs[0], model.regions
    out: dict[tuple, list[tuple[int, list[int]]]] = {}
    for root, members in families(regions):
        r0 = regions[root]
        key = (
            tuple(
                (
                    regions[j].path[len(r0.path) :],
                    regions[j].first_op - r0.first_op,
                    regions[j].end_op - r0.first_op,
                    regions[j].recompute_end - r0.first_op,
                    tuple(p - r0.first_op for p in regions[j].choices),
                    tuple(p - r0.first_op for p in regions[j].kept),
                )
                for j in members
            ),
            tuple(graph.ops[i].name for i in r0.ops),
        )
        out.setdefault(key, []).append((root, members))
    return [fams for fams in out.values() if len(fams) > 1]


def _deal(
    model: _Model, classes: list[list[tuple[int, list[int]]]], saved: dict[int, frozenset[int]], steady: list[int]
) -> dict[int, frozenset[int]]:
    """The same configurations, dealt to each class's layers in forward order by their steady bytes
    (``Evaluation.steady`` of ``saved``: what they hold from their forward to their recomputation), the
    lightest first."""
    regions = model.regions
    out = dict(saved)
    for fams in classes:
        configs = []
        for root, members in fams:
            base = regions[root].first_op
            config = tuple(
                (regions[j].path[len(regions[root].path) :], tuple(sorted(p - base for p in saved[j])))
                for j in members
                if j in saved
            )
            configs.append((sum(steady[j] for j in members), config))
            for j in members:
                out.pop(j, None)
        configs.sort(key=lambda c: c[0])  # stable: ties keep their forward order
        for (root, members), (_, config) in zip(fams, configs):
            by_rel = {regions[j].path[len(regions[root].path) :]: j for j in members}
            base = regions[root].first_op
            for rel, ops in config:
                out[by_rel[rel]] = frozenset(p + base for p in ops)
    return out
