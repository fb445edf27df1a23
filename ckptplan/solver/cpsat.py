"""The CP-SAT model: which regions to checkpoint and which of their ops to save, under a memory budget.

Built in named phases:

1. ``Timeline``: positions (one per traced event, one per op rerun of every candidate region just
   before the backward event that triggers its recomputation) and the baseline live bytes at each.
2. ``_terms``: every way a decision changes memory, as (bytes, literal expression, [lo, hi) positions).
3. ``_Model``: variables, the gap aggregates (per input shape when there are several), one memory constraint
   per distinct set of active terms, and the objective (estimated recompute time).
4. ``_Model.solve``: under a budget, primal.py's first plan (bound.py's knapsack on the binding row,
   checked on every row with ``_Model.evaluate``); when its own bound proves it within the gap, that
   is the answer, with no search (deep chains: the search's root LP alone grows faster than depth).
5. ``_Model._search_cost``: otherwise the search, from that plan; at improving solutions, bound.py's
   knapsack bound on the rows tightest under them proves the integrality gaps CP-SAT's LP bound leaves
   open (``_KnapsackCheck``).

Memory is scaled to ``unit`` bytes (a power of two chosen so the budget is about 2^22 units) in one
place, ``_Model.scale``: baseline memory and added bytes round up, saved bytes round down, so a
solution of the scaled model never uses more memory than the model says. The independent simulator
(simulate.py) then checks every solution in exact bytes.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import dataclass, replace
from enum import Enum
from typing import Callable

from ortools.sat.python import cp_model

from ..graph import Graph
from . import bound, primal
from .regions import Region, nested_pairs
from .remat import SHARED_HOOK
from .rows import Evaluation, Term, TermKind, Timeline, terms as memory_terms

BOUND_ROWS = 3  # the memory rows tightest under a solution that bound.py solves exactly
# primal.py's table cells charged as one second of CP-SAT's deterministic clock: cells run at ~6e8 a
# wall second here, CP-SAT's clock at ~0.3 units a wall second (2e9 cells a unit); charged double
CELLS_PER_DET_S = 10**9


class Objective(str, Enum):
    """What the plan minimises. Time is the default: FLOPs call a recomputed GELU or LayerNorm free."""

    TIME = "time"  # estimated recompute time (costmodel.py)
    FLOPS = "flops"  # recomputed FLOPs first, then estimated time among the plans with that many


class Status(str, Enum):
    OPTIMAL = "optimal"
    FEASIBLE = "feasible"
    INFEASIBLE = "infeasible"
    UNKNOWN = "unknown"  # time limit with no solution


@dataclass(frozen=True, slots=True, kw_only=True)
class Solution:
    status: Status
    saved: dict[str, frozenset[int]]  # checkpointed region -> ops it saves
    objective_ns: int  # estimated recompute time, in the model's own terms
    bound_ns: int  # best proven lower bound on the estimated time
    objective_flops: int = 0  # recomputed FLOPs (the primary objective under Objective.FLOPS)
    bound_flops: int = 0  # best proven lower bound on them, under Objective.FLOPS
    objective: Objective = Objective.TIME
    wall_s: float
    deterministic_s: float  # CP-SAT's deterministic clock: the same model and limit stop at the same point
    num_variables: int
    num_constraints: int
    searched: bool = True  # False: primal.py's first plan, proven within the gap with no CP-SAT search
    peak_bound: int = 0  # minimum-peak search: its proven lower bound on the model's peak (model units)

    @property
    def gap(self) -> float:
        """Proven relative gap of the primary objective."""
        value, bound = ((self.objective_flops, self.bound_flops) if self.objective is Objective.FLOPS
                        else (self.objective_ns, self.bound_ns))
        if value <= 0:
            return 0.0
        return max(0.0, (value - bound) / value)


class _Progress(cp_model.CpSolverSolutionCallback):
    """At each improving solution: asks ``check`` (when given) for a bound found outside CP-SAT and whether
    it proves the solution within the gap, then stops the search; reports (objective, best bound). With
    the same model and limits the same solutions arrive in the same order, so this stays deterministic."""

    def __init__(self, report: Callable[[float, float], None] | None,
                 check: Callable[[cp_model.CpSolverSolutionCallback], tuple[int, bool]] | None) -> None:
        super().__init__()
        self.report, self.check = report, check

    def on_solution_callback(self) -> None:
        lower, proven = self.check(self) if self.check is not None else (0, False)
        if self.report is not None:
            self.report(self.objective_value, max(self.best_objective_bound, lower))
        if proven:
            self.stop_search()


class _KnapsackCheck:
    """bound.py's knapsack bound on the ``BOUND_ROWS`` memory rows tightest under a solution (each row
    solved once, a solution checked when it improves on the last one checked by half the gap). When they
    fall short of the gap, the best of them once more at bound.py's finer resolution.

    No row is solved after ``deadline`` (``time.monotonic()``; the search's wall-clock limit): CP-SAT
    cannot stop while a callback runs, and a row of the 7B model takes 0.5 s (the finer pass 1.2 s, on
    the 2-core machine, idle), so checks begun near the limit, and the final solution's check after it,
    added their time to the limit; a row still being solved when it passes stops there and bounds
    nothing. Rows solved before it still count. A search cut on the deterministic
    clock ends before the deadline, and its checks are unchanged, so its plan stays byte-identical."""

    def __init__(self, model: "_Model", capacity: int, gap_limit: float, known: int = 0,
                 deadline: float = math.inf) -> None:
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
            slack = sorted((self.capacity - base - (e if isinstance(e, int) else solution.value(e)), i)
                           for i, (base, e, ub) in enumerate(model.row_exprs) if ub > self.capacity)
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
            found = bound.lower_bound(self.model.regions, self.model.row_form(row), self.capacity, self.cost,
                                      buckets=buckets, deadline=self.deadline)
            self.rows[(row, buckets)] = found or 0
        self.known = max(self.known, min(self.rows[(row, buckets)], value))  # never above a solution


class _Model:
    """CP-SAT variables and constraints for one graph; solved once per budget."""

    def __init__(self, graphs: list[Graph], regions_per_graph: list[tuple[Region, ...]], scale_to: int) -> None:
        """``graphs``: the same step at one or more input shapes; their candidate regions (aligned: same
        paths, same op choices) share one set of decision variables."""
        self.graphs, self.regions = graphs, regions_per_graph[0]
        self.regions_per_graph = regions_per_graph
        regions = self.regions
        self.unit = 1
        while scale_to // self.unit > (1 << 22):
            self.unit <<= 1
        self.m = cp_model.CpModel()
        m = self.m
        # c[j]: 1 iff region j is checkpointed
        self.c = [m.new_bool_var(f"c[{r.path}]") for r in regions]
        # k[j, p]: 1 iff region j is checkpointed and saves op p's outputs (selective checkpointing)
        self.k: dict[tuple[int, int], cp_model.IntVar] = {}
        for j, r in enumerate(regions):
            for p in r.choices:
                self.k[(j, p)] = m.new_bool_var(f"k[{r.path},{p}]")
                # [Constraint] only a checkpointed region caches anything
                m.add_implication(self.k[(j, p)], self.c[j])
        # sel[j]: 1 iff region j runs under selective checkpointing, which it must to cache any op (a
        # region that caches nothing runs as plain checkpoint); only where its dispatch modes cost time
        self.sel: dict[int, cp_model.IntVar] = {}
        for j, r in enumerate(regions):
            if r.choices and any(own[j].selective_ns for own in regions_per_graph):
                self.sel[j] = m.new_bool_var(f"sel[{r.path}]")
                # [Constraint] caching an op needs selective checkpointing, which needs a checkpoint
                for p in r.choices:
                    m.add_implication(self.k[(j, p)], self.sel[j])
                m.add_implication(self.sel[j], self.c[j])
        # (x[j, p] = c[j] - k[j, p] is 1 iff op p is recomputed with region j; never a variable of its own)
        for a, b in nested_pairs(regions):
            # [Constraint] checkpointed regions never nest
            m.add_bool_or([self.c[a].Not(), self.c[b].Not()])
        self.z: dict[tuple[int, int, int], cp_model.IntVar] = {}
        self.row_exprs: list[tuple[int, cp_model.LinearExprT, int]] = []
        # per row: (input shape, regions counted as steady aggregates, other active terms), for bound.py
        self.row_terms: list[tuple[int, tuple[int, ...], tuple[int, ...]]] = []
        self.terms: list[tuple[list[Term], list[list[int]]]] = []  # per input shape: terms, steady terms per region
        self.g: list[list[cp_model.IntVar]] = []  # per input shape: the steady aggregate of each region
        self.prefix: list[list[tuple[cp_model.IntVar, int]]] = []  # per input shape: (s[i], the region it adds)
        for gi, (graph, own) in enumerate(zip(graphs, regions_per_graph)):  # rows for every input shape
            tl = Timeline(graph, own)
            terms = memory_terms(graph, own, tl)
            gap_terms, g = self._build_gap_aggregates(gi, terms)
            self.terms.append((terms, gap_terms))
            self.g.append(g)
            self._build_memory_rows(gi, tl, terms, gap_terms, g)
        top = max((ub for _, _, ub in self.row_exprs), default=0)
        # peak: the step's peak memory in units (an upper bound on every row of every shape)
        self.peak = self.m.new_int_var(0, max(top, 1), "peak")
        self._build_objective()

    # ---- helpers -----------------------------------------------------------------------------------
    def scale(self, nbytes: int) -> int:
        """Bytes to model units, rounded up: baseline memory is never underestimated."""
        return -((-nbytes) // self.unit)

    def expr(self, t: Term) -> cp_model.LinearExpr:
        if t.kind is TermKind.CHECKPOINTED:
            return self.c[t.region]
        if t.kind is TermKind.SAVED:
            return self.k[(t.region, t.op)]
        if t.kind is TermKind.RECOMPUTED:
            return self.c[t.region] - self.k[(t.region, t.op)]
        # z = (op p recomputed) AND (region `other` checkpointed), linearised from below
        key = (t.region, t.op, t.other)
        if key not in self.z:
            z = self.m.new_bool_var(f"z[{t.op},{self.regions[t.other].path}]")
            rec = self.c[t.region] if t.kind is TermKind.HELD_FORCED else self.c[t.region] - self.k[(t.region, t.op)]
            # [Constraint] z >= rec + c[other] - 1: the storage is held by the other region's checkpoint
            self.m.add(z >= rec + self.c[t.other] - 1)
            self.z[key] = z
        return self.z[key]

    def coef(self, t: Term) -> int:
        # [Scaling] added bytes round up, freed bytes round down (conservative either way)
        return -((-t.nbytes) // self.unit) if t.nbytes > 0 else -((-t.nbytes) // self.unit)

    # ---- phases --------------------------------------------------------------------------------------
    def _build_gap_aggregates(self, gi: int, terms: list[Term]) -> tuple[list[list[int]], list[cp_model.IntVar]]:
        gap_terms: list[list[int]] = [[] for _ in self.regions]
        for i, t in enumerate(terms):
            if t.gap:
                gap_terms[t.region].append(i)
        # g[j]: region j's net effect on memory between its forward and its recomputation (units)
        g = []
        for j, idx in enumerate(gap_terms):
            lo = sum(min(0, self.coef(terms[i])) for i in idx)
            hi = sum(max(0, self.coef(terms[i])) for i in idx)
            var = self.m.new_int_var(lo, hi, f"g[{gi},{self.regions[j].path}]")
            # [Constraint] g[j] is the sum of region j's steady terms
            self.m.add(var == sum(self.coef(terms[i]) * self.expr(terms[i]) for i in idx))
            g.append(var)
        return gap_terms, g

    def _build_memory_rows(self, gi: int, tl: Timeline, terms: list[Term], gap_terms: list[list[int]],
                           g: list[cp_model.IntVar]) -> None:
        """One row per distinct set of active terms: base (max over its positions) + terms <= peak.

        A region whose steady terms are all active enters a row as its aggregate ``g[j]``. Many regions
        are (every layer before the current one, in forward and in backward), so the rows sum them
        through prefix sums ``s[i] = g[order[0]] + ... + g[order[i-1]]``, ordered by when regions become
        steady: a row's steady set is then one or a few runs of that order, two terms each, and the
        model grows linearly with depth instead of quadratically (Llama-7B shape, 32 layers: 342k terms).
        The equalities add nothing to the LP relaxation: it is the same polytope.
        """
        n = tl.size
        starts: list[list[int]] = [[] for _ in range(n + 1)]
        ends: list[list[int]] = [[] for _ in range(n + 1)]
        for i, t in enumerate(terms):
            starts[t.lo].append(i)
            ends[t.hi].append(i)
        partial: set[int] = set()  # active terms, less those of steady regions (summed as g)
        full: set[int] = set()  # regions whose steady terms are all active
        gap_active = [0] * len(self.regions)
        order: dict[int, int] = {}  # region -> rank by the position it first becomes steady
        rows: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
        key: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())  # nothing active before position 0
        for pos in range(n):
            changed = bool(ends[pos] or starts[pos])
            for i in ends[pos]:
                t = terms[i]
                if t.gap:
                    if t.region in full:  # no longer steady: its other active terms count one by one
                        full.discard(t.region)
                        partial.update(x for x in gap_terms[t.region] if x != i)
                    gap_active[t.region] -= 1
                partial.discard(i)
            for i in starts[pos]:
                t = terms[i]
                partial.add(i)
                if t.gap:
                    gap_active[t.region] += 1
                    if gap_active[t.region] == len(gap_terms[t.region]):
                        full.add(t.region)
                        order.setdefault(t.region, len(order))
                        partial.difference_update(gap_terms[t.region])
            if changed:
                key = (tuple(sorted(full)), tuple(sorted(partial)))
            if rows.get(key, -1) < tl.base[pos]:
                rows[key] = tl.base[pos]
        ranked = sorted(order, key=order.__getitem__)
        steady_hi = [sum(max(0, self.coef(terms[i])) for i in idx) for idx in gap_terms]
        # s[i]: the steady contribution of the first i regions to become steady (units); s[0] = 0
        prefix: list[cp_model.LinearExpr | int] = [0]
        self.prefix.append([])
        lo = hi = 0
        for rank, j in enumerate(ranked):
            lo, hi = lo + g[j].proto.domain[0], hi + g[j].proto.domain[-1]
            var = self.m.new_int_var(lo, hi, f"s[{gi},{rank + 1}]")
            # [Constraint] s[i + 1] = s[i] + g[order[i]]
            self.m.add(var == prefix[-1] + g[j])
            prefix.append(var)
            self.prefix[gi].append((var, j))
        # each term's coefficient, and its coefficient x literal made once at its first row (in the same order
        # as before, so the same variables): a term is in hundreds of rows (HF Mamba: 575k row terms from
        # 2.6k terms; building them one by one was 3.5 s of CPU)
        coefs = [self.coef(t) for t in terms]
        made: dict[int, cp_model.LinearExpr] = {}

        def product(i: int) -> cp_model.LinearExpr:
            if i not in made:
                made[i] = coefs[i] * self.expr(terms[i])
            return made[i]

        # [Constraint] per row: base (max over the row's positions) + steady regions + other active terms <= peak
        for (steady, others), base in sorted(rows.items(), key=lambda kv: kv[0]):
            runs = _runs(sorted(order[j] for j in steady))
            e = sum(prefix[b] - prefix[a] for a, b in runs) + sum(product(i) for i in others)
            ub = self.scale(base) + sum(steady_hi[j] for j in steady) + sum(max(0, coefs[i]) for i in others)
            self.row_exprs.append((self.scale(base), e, ub))
            self.row_terms.append((gi, steady, others))

    def _build_objective(self) -> None:
        # cost: estimated time of every op the recomputations rerun (early stop honoured), of each
        # checkpoint call and of selective checkpointing's dispatch modes, summed over the input shapes
        # (each shape's step is equally likely); flops: the rerun ops' FLOPs
        # (key, ns summed over the input shapes, regions) of each cost regions share (Region.shared)
        self.shared = self._shared_costs()
        self.cost_form = self._rerun_form(lambda op: op.cost_ns, overheads=True)  # also bound.py's objective
        # u[g]: 1 iff some region of shared cost g is checkpointed (a recipe mode, the saved-tensor hook)
        self.u = [self.m.new_bool_var(f"u[{g}]") for g in range(len(self.cost_form.shared))]
        for var, (_, members) in zip(self.u, self.cost_form.shared):
            for j in members:
                # [Constraint] a region on pays the costs it shares (minimising keeps u at 0 otherwise)
                self.m.add_implication(self.c[j], var)
        # the u of the saved-tensor hook, which every rematerialization shares: the search branches on it
        # (``_search_branches``); the LP relaxation alone prices it at its largest fractional c
        hooks = [var for var, (key, _, _) in zip(self.u, self.shared) if key == SHARED_HOOK]
        self.hook = hooks[0] if hooks else None
        self.remat_paths = frozenset(r.path for r in self.regions if r.remat)
        self.cost = self._linear(self.cost_form) + sum(a * var for var, (a, _) in zip(self.u, self.cost_form.shared))
        self.flops = self._linear(self._rerun_form(lambda op: op.flops, overheads=False))

    def _rerun_form(self, value: Callable, *, overheads: bool) -> bound.LinearForm:
        """``value`` summed over every op a checkpointed region reruns: on its region's c, less on its k;
        with ``overheads``, each region's checkpoint cost on its c and its dispatch modes' on its sel."""
        c: dict[int, int] = {}
        k: dict[tuple[int, int], int] = {}
        s: dict[int, int] = {}
        for j, r in enumerate(self.regions):
            if overheads:
                c[j] = sum(own[j].checkpoint_ns for own in self.regions_per_graph)
                if j in self.sel:
                    s[j] = sum(own[j].selective_ns for own in self.regions_per_graph)
            for p in (r.recipe if r.remat else range(r.first_op, r.recompute_end)):
                v = sum(value(graph.ops[p]) for graph in self.graphs)
                if v:
                    c[j] = c.get(j, 0) + v
                    if (j, p) in self.k:
                        k[(j, p)] = -v
        return bound.LinearForm(c={j: a for j, a in c.items() if a}, k=k, z={}, s=s,
                                shared=tuple((a, js) for _, a, js in self.shared) if overheads else ())

    def _shared_costs(self) -> list[tuple[str, int, tuple[int, ...]]]:
        """(key, ns summed over the input shapes, regions carrying it) of each cost regions share, by key."""
        ns: dict[str, int] = {}
        members: dict[str, list[int]] = {}
        for j in range(len(self.regions)):
            for key in dict(self.regions[j].shared):
                ns[key] = max(ns.get(key, 0), sum(dict(own[j].shared).get(key, 0) for own in self.regions_per_graph))
                members.setdefault(key, []).append(j)
        return [(key, ns[key], tuple(members[key])) for key in sorted(ns) if ns[key]]

    def _linear(self, form: bound.LinearForm) -> cp_model.LinearExpr | int:
        parts = ([a * self.c[j] for j, a in form.c.items()] + [a * self.k[key] for key, a in form.k.items()]
                 + [a * self.sel[j] for j, a in form.s.items()])
        return sum(parts) if parts else 0

    # ---- a plan's values, without a solver ----------------------------------------------------------------
    def evaluate(self, saved: dict[int, frozenset[int]]) -> Evaluation:
        """Every row's value (base included, model units) and the cost of checkpointing ``saved``'s regions
        (by index) and caching the ops listed; ``values`` completes the hint CP-SAT is given."""
        values: dict[int, int] = {}  # CP-SAT variable index -> value
        for j, var in enumerate(self.c):
            values[var.index] = int(j in saved)
        for (j, p), var in self.k.items():
            values[var.index] = int(j in saved and p in saved[j])
        for j, var in self.sel.items():
            values[var.index] = int(bool(saved.get(j)))
        for var, (_, members) in zip(self.u, self.cost_form.shared):
            values[var.index] = int(any(j in saved for j in members))
        row_values = [base for base, _, _ in self.row_exprs]
        largest: list[int] = []  # g of the largest input shape
        for gi, (terms, gap_terms) in enumerate(self.terms):
            term_value = [self.coef(t) * _literal(t, saved) for t in terms]
            for t in terms:
                if t.kind in (TermKind.HELD, TermKind.HELD_FORCED):
                    values[self.z[(t.region, t.op, t.other)].index] = _literal(t, saved)
            g = [sum(term_value[i] for i in idx) for idx in gap_terms]
            if gi == 0:
                largest = g
            for j, var in enumerate(self.g[gi]):
                values[var.index] = g[j]
            total = 0
            for var, j in self.prefix[gi]:
                total += g[j]
                values[var.index] = total
            for row, (shape, steady, others) in enumerate(self.row_terms):
                if shape == gi:
                    row_values[row] += sum(g[j] for j in steady) + sum(term_value[i] for i in others)
        cost = self.cost_form.value(saved)
        values[self.peak.index] = max(row_values, default=0)
        return Evaluation(rows=row_values, cost=cost, values=values, steady=largest)

    # ---- solving -------------------------------------------------------------------------------------
    def solve(self, *, budget_bytes: int | None, time_limit_s: float, hint: dict[str, frozenset[int]] | None,
              workers: int = 1, deterministic_limit: float | None = None,
              on_solution: Callable[[float, float], None] | None = None,
              objective: Objective = Objective.TIME, gap_limit: float = 0.0, first_plan: bool = True,
              stop_at: int | None = None) -> Solution:
        """Minimise ``objective`` under ``budget_bytes``; with ``None``, minimise the peak instead.

        ``stop_at`` (bytes, minimum-peak search only) ends that search at the first solution whose peak is
        within it: the budget is then feasible, and the exact minimum not needed. Its ``peak_bound`` is the
        search's proven lower bound on the peak (model units).

        ``deterministic_limit`` stops the search on CP-SAT's deterministic clock, so that a solve cut short
        returns the same plan on every run; ``time_limit_s`` is a wall-clock backstop. ``on_solution`` is
        called with (objective, best bound) at every improving solution, for progress displays.
        ``gap_limit`` stops the search once the proven relative gap is that small (0: prove optimality).
        Under ``Objective.FLOPS`` the FLOPs are minimised first (half the limits), then the estimated
        time among plans with no more FLOPs than that. ``first_plan=False`` skips primal.py's plan (to
        check it against CP-SAT's own search).
        """
        m = self.m.clone()
        peak = m.get_int_var_from_proto_index(self.peak.index)
        for base, e, ub in self.row_exprs:
            if budget_bytes is not None and ub <= budget_bytes // self.unit:
                continue  # can never bind at this budget
            m.add(base + e <= peak)
        if budget_bytes is None:
            m.minimize(peak)
            target = None if stop_at is None else stop_at // self.unit
            solver, status = self._run(
                m, hint, time_limit_s, deterministic_limit, workers, on_solution,
                check=None if target is None else lambda found: (0, found.objective_value <= target),
                # no probing: the peak's proof needs 2-5x less work without it, the same minimum (HF Mamba:
                # 2.57 -> 0.62 deterministic s; ResNet 0.23 -> 0.05; Whisper 0.21 -> 0.11)
                probing=False)
            sol = self._solution(m, solver, status, time_minimised=False)
            lower = solver.best_objective_bound  # before a search begins: the objective's domain, or none
            bounded = math.isfinite(lower) and status is not Status.INFEASIBLE
            return replace(sol, peak_bound=int(lower) if bounded else 0)
        # [Constraint] the step's peak stays within the budget
        m.add(peak <= budget_bytes // self.unit)
        first: tuple[int, int, float, float] | None = None  # FLOPs stage: value, bound, wall s, deterministic s
        if objective is Objective.FLOPS and not isinstance(self.flops, int):
            m.minimize(self.flops)
            half = None if deterministic_limit is None else deterministic_limit / 2
            remats = [j for j, r in enumerate(self.regions) if r.remat]
            before = (0.0, 0.0)  # wall and deterministic seconds of that first search
            if remats:
                # the same FLOPs search with every rematerialization off first, on a quarter of the limits:
                # its plans are plans of the whole model, and CP-SAT finds them far sooner in the smaller
                # space (HF Llama at 69%: a 0-FLOP plan in 1 s, against none with 41% in 15 s)
                plain = m.clone()
                for j in remats:
                    # [Constraint] this first search rematerializes nothing
                    plain.add(self.c[j] == 0)
                quarter = None if half is None else half / 2
                solver, status = self._run(plain, hint, time_limit_s / 4, quarter, workers, on_solution, gap_limit)
                if status in (Status.OPTIMAL, Status.FEASIBLE):
                    hint = self._decisions(solver)
                before = (solver.wall_time, solver.response_proto.deterministic_time)
                time_limit_s = max(0.1, time_limit_s - before[0])
                if deterministic_limit is not None:  # as half is
                    deterministic_limit = max(0.02, deterministic_limit - before[1])
                    half = deterministic_limit / 2
            solver, status = self._run(m, hint, time_limit_s / 2, half, workers, on_solution, gap_limit)
            if status not in (Status.OPTIMAL, Status.FEASIBLE):
                return self._solution(m, solver, status, time_minimised=False)
            value = int(solver.value(self.flops))
            spent_det = solver.response_proto.deterministic_time
            first = (value, min(value, int(solver.best_objective_bound)), solver.wall_time + before[0],
                     spent_det + before[1])
            # [Constraint] no more recomputed FLOPs than the best plan found; now the fastest such plan
            m.add(self.flops <= value)
            hint = self._decisions(solver)
            time_limit_s = max(0.1, time_limit_s - solver.wall_time)
            if deterministic_limit is not None:  # the first search's share is already taken off
                deterministic_limit = max(0.01, deterministic_limit - spent_det)
        m.minimize(self.cost)
        known, spent, charged = 0, 0.0, 0.0
        start: primal.FirstPlan | None = None
        if first_plan and first is None and not isinstance(self.cost, int):
            # a first plan from bound.py's knapsack (primal.py), on at most half the deterministic limit,
            # charged to it: often proven within the gap as it is
            started = time.monotonic()
            # the wall-clock limit holds here too: past it the first plan stops with the best it has
            cells = None if deterministic_limit is None else int(deterministic_limit * CELLS_PER_DET_S / 2)
            start = primal.first_plan(self, budget_bytes // self.unit, gap=gap_limit, work_limit=cells,
                                      deadline=bound.clock() + time_limit_s)
            spent, charged = time.monotonic() - started, start.work / CELLS_PER_DET_S
            if deterministic_limit is not None:
                deterministic_limit = max(0.01, deterministic_limit - charged)
            known = start.bound  # valid with or without a plan
            if start.saved is not None:
                if on_solution is not None:
                    on_solution(start.cost, start.bound)
                if start.cost - start.bound <= gap_limit * start.cost:
                    return self._first_plan_solution(m, start, spent)
                hint = self._paths(start.saved)
            time_limit_s = max(0.1, time_limit_s - spent)
        sol = self._search_branches(m, hint, budget_bytes // self.unit, time_limit_s, deterministic_limit, workers,
                                    None if first else on_solution, gap_limit, first, known)
        if sol.status is Status.UNKNOWN and first is None and start is not None and start.saved is not None:
            # the search's limit came before it found a plan (on a loaded machine, the wall clock): the first
            # plan fits every row, so it is the answer, with the knapsack's bound
            sol = replace(self._first_plan_solution(m, start, 0.0), wall_s=sol.wall_s,
                          deterministic_s=sol.deterministic_s, searched=True)
        return replace(sol, wall_s=sol.wall_s + spent, deterministic_s=sol.deterministic_s + charged)

    def _search_branches(self, m: cp_model.CpModel, hint: dict[str, frozenset[int]] | None, capacity: int,
                         time_limit_s: float, deterministic_limit: float | None, workers: int,
                         report: Callable[[float, float], None] | None, gap_limit: float,
                         first: tuple[int, int, float, float] | None, known: int) -> Solution:
        """``_search_cost``, split on the saved-tensor hook when the plan may rematerialize: once with no
        rematerialization (a smaller model), once with the hook paid whatever the plan (a constant: the LP
        prices it exactly); the hint's branch first, on half the limits, the other only below its plan
        (proven infeasible, it proves that plan). Unsplit, the relaxation charges the hook only as much as
        its largest fractional rematerialization, and the search cannot prove a plan without one (HF
        Llama at 66%: 10% gap after 30 s). The better plan wins; the lesser bound holds for both."""
        if self.hook is None:
            return self._search_cost(m, hint, capacity, time_limit_s, deterministic_limit, workers, report,
                                     gap_limit, first, known)
        started = time.monotonic()
        sols: list[Solution] = []
        # the hint's branch first: its plan, found again at once, then cuts the other branch's search
        on = hint is not None and any(path in self.remat_paths for path in hint)
        for value, share in ((int(on), 0.5), (int(not on), 1.0)):
            branch = m.clone()
            # [Constraint] this branch rematerializes nothing (0), or pays the saved-tensor hook (1)
            branch.add(self.hook == value)
            if sols and sols[0].status in (Status.OPTIMAL, Status.FEASIBLE):
                # [Constraint] the second branch only looks for a plan cheaper than the first branch's
                branch.add(self.cost <= sols[0].objective_ns - 1)
            left = time_limit_s - (time.monotonic() - started)
            det = None if deterministic_limit is None else deterministic_limit - sum(x.deterministic_s for x in sols)
            plain = hint if value or hint is None else {
                path: ops for path, ops in hint.items() if path not in self.remat_paths}
            sols.append(self._search_cost(branch, plain, capacity, max(0.1, left * share),
                                          None if det is None else max(0.01, det * share), workers, report,
                                          gap_limit, first, known, branch=True))
        found = [x for x in sols if x.status in (Status.OPTIMAL, Status.FEASIBLE)]
        wall, det_s = sum(x.wall_s for x in sols), sum(x.deterministic_s for x in sols)
        if not found:
            status = Status.INFEASIBLE if all(x.status is Status.INFEASIBLE for x in sols) else Status.UNKNOWN
            return replace(sols[-1], status=status, wall_s=wall, deterministic_s=det_s)
        best = min(found, key=lambda x: x.objective_ns)
        # a branch bounds its plans at its proven bound; an infeasible one holds none, an unfinished one
        # bounds nothing
        lower = min(x.bound_ns if x in found else best.objective_ns if x.status is Status.INFEASIBLE else 0
                    for x in sols)
        # proven when neither branch holds a cheaper plan: best's own status then (the FLOPs stage's may
        # be unproven)
        status = best.status if lower >= best.objective_ns else Status.FEASIBLE
        return replace(best, status=status, bound_ns=min(lower, best.objective_ns), wall_s=wall, deterministic_s=det_s,
                       num_variables=len(m.proto.variables), num_constraints=len(m.proto.constraints))

    def _search_cost(self, m: cp_model.CpModel, hint: dict[str, frozenset[int]] | None, capacity: int,
                     time_limit_s: float, deterministic_limit: float | None, workers: int,
                     report: Callable[[float, float], None] | None, gap_limit: float,
                     first: tuple[int, int, float, float] | None, known: int = 0, branch: bool = False) -> Solution:
        """Minimise the cost. CP-SAT's LP bound leaves integrality gaps open on deep models; the knapsack
        check closes them at improving solutions and stops the search once one is proven within the gap.
        ``known``: a lower bound on the cost found before the search. ``branch``: ``m`` is one branch of
        the search, which may hold no plan."""
        deadline = time.monotonic() + time_limit_s  # CP-SAT's own wall-clock limit, as the checks see it
        check = None if isinstance(self.cost, int) else _KnapsackCheck(self, capacity, gap_limit, known, deadline)
        solver, status = self._run(m, hint, time_limit_s, deterministic_limit, workers, report, gap_limit, check)
        lower = 0
        if check is not None and status in (Status.OPTIMAL, Status.FEASIBLE):
            lower = check(solver)[0]  # and the final solution's tight rows, if it was not checked
        return self._solution(m, solver, status, time_minimised=True, flops_stage=first, known_bound=lower,
                              branch=branch)

    def _run(self, m: cp_model.CpModel, hint: dict[str, frozenset[int]] | None, time_limit_s: float,
             deterministic_limit: float | None, workers: int,
             on_solution: Callable[[float, float], None] | None, gap_limit: float = 0.0,
             check: Callable[[cp_model.CpSolverSolutionCallback], tuple[int, bool]] | None = None,
             probing: bool = True) -> tuple[cp_model.CpSolver, Status]:
        if hint:
            m.clear_hints()  # the FLOPs stage's plan replaces the first hint
            self._add_hint(m, hint)
        solver = cp_model.CpSolver()
        solver.parameters.max_time_in_seconds = time_limit_s
        if deterministic_limit is not None:
            solver.parameters.max_deterministic_time = deterministic_limit
        solver.parameters.num_workers = workers
        solver.parameters.relative_gap_limit = gap_limit
        solver.parameters.random_seed = 0
        # more cuts in the LP relaxation: the memory rows are knapsacks, whose default LP bound is weak
        # (7B shape, 32 layers, 60% budget: gap 57% -> 0.5% in the same time)
        solver.parameters.linearization_level = 2
        if not probing:
            solver.parameters.cp_model_probing_level = 0
        # one worker is deterministic (and fastest on small machines); more interleave to stay so
        solver.parameters.interleave_search = workers > 1
        main = threading.current_thread() is threading.main_thread()
        handler = signal.getsignal(signal.SIGINT) if main else None
        code = solver.solve(m, _Progress(on_solution, check) if on_solution or check else None)
        if handler is not None:  # CP-SAT stops its search on Ctrl-C, then leaves SIGINT killing the process
            signal.signal(signal.SIGINT, handler)
        status = {cp_model.OPTIMAL: Status.OPTIMAL, cp_model.FEASIBLE: Status.FEASIBLE,
                  cp_model.INFEASIBLE: Status.INFEASIBLE}.get(code, Status.UNKNOWN)
        return solver, status

    def row_form(self, index: int) -> bound.LinearForm:
        """Row ``index`` as a linear form over c, k and z (steady aggregates expanded)."""
        gi, steady, others = self.row_terms[index]
        terms, gap_terms = self.terms[gi]
        c: dict[int, int] = {}
        k: dict[tuple[int, int], int] = {}
        z: dict[tuple[int, int, int, bool], int] = {}
        for i in [i for j in steady for i in gap_terms[j]] + list(others):
            t = terms[i]
            a = self.coef(t)
            if t.kind in (TermKind.CHECKPOINTED, TermKind.RECOMPUTED):  # x = c - k
                c[t.region] = c.get(t.region, 0) + a
            if t.kind in (TermKind.SAVED, TermKind.RECOMPUTED):
                key = (t.region, t.op)
                k[key] = k.get(key, 0) + (a if t.kind is TermKind.SAVED else -a)
            if t.kind in (TermKind.HELD, TermKind.HELD_FORCED):
                zkey = (t.region, t.op, t.other, t.kind is TermKind.HELD_FORCED)
                z[zkey] = z.get(zkey, 0) + a
        return bound.LinearForm(c=c, k=k, z=z, constant=self.row_exprs[index][0])

    def _paths(self, saved: dict[int, frozenset[int]]) -> dict[str, frozenset[int]]:
        return {self.regions[j].path: ops for j, ops in saved.items()}

    def _first_plan_solution(self, m: cp_model.CpModel, start: primal.FirstPlan, wall_s: float) -> Solution:
        """The knapsack's first plan, proven within the gap without a search (or the answer when the search
        found none): every row was checked in the model's own terms (``evaluate``), and the bound is
        bound.py's."""
        assert start.saved is not None  # both callers check
        return Solution(status=Status.OPTIMAL if start.bound >= start.cost else Status.FEASIBLE,
                        saved=self._paths(start.saved), objective_ns=start.cost, bound_ns=start.bound,
                        wall_s=wall_s, deterministic_s=start.work / CELLS_PER_DET_S,
                        num_variables=len(m.proto.variables),
                        num_constraints=len(m.proto.constraints), searched=False)

    def _decisions(self, solver: cp_model.CpSolver) -> dict[str, frozenset[int]]:
        return {r.path: frozenset(p for p in r.choices if solver.boolean_value(self.k[(j, p)]))
                for j, r in enumerate(self.regions) if solver.boolean_value(self.c[j])}

    def _solution(self, m: cp_model.CpModel, solver: cp_model.CpSolver, status: Status, *, time_minimised: bool,
                  flops_stage: tuple[int, int, float, float] | None = None, known_bound: int = 0,
                  branch: bool = False) -> Solution:
        """The solution in the solver's hands, with the FLOPs stage's result when there was one.

        ``known_bound``: a lower bound on the cost found outside CP-SAT (the knapsack bound).
        """
        saved: dict[str, frozenset[int]] = {}
        value = lower = 0
        if status in (Status.OPTIMAL, Status.FEASIBLE):
            saved = self._decisions(solver)
            value = int(solver.value(self.cost)) if not isinstance(self.cost, int) else 0
            lower = max(int(solver.best_objective_bound), known_bound) if time_minimised else value
            if status is Status.OPTIMAL and time_minimised and lower < value:
                status = Status.FEASIBLE  # stopped by the gap limit: CP-SAT calls that optimal
            if status is Status.FEASIBLE and time_minimised and lower >= value:
                status = Status.OPTIMAL  # the knapsack bound proves it
        flops, flops_bound, wall, det = flops_stage or (0, 0, 0.0, 0.0)
        if flops_stage is not None:
            if status is Status.INFEASIBLE and not branch:
                status = Status.UNKNOWN  # cannot be: the FLOPs stage's plan satisfies the time stage
            if status is Status.OPTIMAL and flops_bound < flops:
                status = Status.FEASIBLE  # the time stage is optimal, the FLOPs stage was not proven
        return Solution(status=status, saved=saved, objective_ns=value, bound_ns=min(lower, value),
                        objective_flops=flops, bound_flops=flops_bound,
                        objective=Objective.FLOPS if flops_stage else Objective.TIME,
                        wall_s=solver.wall_time + wall,
                        deterministic_s=solver.response_proto.deterministic_time + det,
                        num_variables=len(m.proto.variables),
                        num_constraints=len(m.proto.constraints))

    def _add_hint(self, m: cp_model.CpModel, hint: dict[str, frozenset[int]]) -> None:
        """Every variable's value under the plan ``hint``, not only its decisions: CP-SAT then starts from
        it at once instead of completing it in its search (64 layers: 0.4 s instead of 3.7 s)."""
        by_index = {j: frozenset(p for p in hint[r.path] if (j, p) in self.k)
                    for j, r in enumerate(self.regions) if r.path in hint}
        for index, value in sorted(self.evaluate(by_index).values.items()):
            m.add_hint(m.get_int_var_from_proto_index(index), value)


def _literal(t: Term, saved: dict[int, frozenset[int]]) -> int:
    """The value of term ``t``'s literal under ``saved`` (checkpointed region index -> ops it saves)."""
    on = t.region in saved
    if t.kind is TermKind.CHECKPOINTED:
        return int(on)
    if t.kind is TermKind.SAVED:
        return int(on and t.op in saved[t.region])
    recomputed = on and (t.kind is TermKind.HELD_FORCED or t.op not in saved[t.region])
    return int(recomputed and (t.kind is TermKind.RECOMPUTED or t.other in saved))


def _runs(ranks: list[int]) -> list[tuple[int, int]]:
    """Sorted ranks as half-open runs of consecutive ranks: [0, 1, 2, 5] -> [(0, 3), (5, 6)]."""
    out: list[tuple[int, int]] = []
    for r in ranks:
        if out and out[-1][1] == r:
            out[-1] = (out[-1][0], r + 1)
        else:
            out.append((r, r + 1))
    return out


def build(graph: Graph | list[Graph], regions: tuple[Region, ...] | list[tuple[Region, ...]],
          scale_to: int) -> _Model:
    """The model for one graph, or for the same step at several input shapes (one set of decisions)."""
    if isinstance(graph, Graph):
        return _Model([graph], [regions], scale_to)  # type: ignore[list-item]  # one graph: one tuple of regions
    return _Model(list(graph), list(regions), scale_to)  # type: ignore[arg-type]  # several: one tuple each


__all__ = ["Objective", "Solution", "Status", "build"]
