"""The first plan (solver/primal.py): fits every row, never beats CP-SAT's proven optimum, and its bound
never exceeds it; the model's own evaluation of a plan (``_Model.evaluate``) is CP-SAT's."""

from __future__ import annotations

import math
import random

import pytest
from ortools.sat.python import cp_model

from ckptplan.solver import bound, cpsat, primal
from ckptplan.solver.regions import candidate_regions, outermost
from ckptplan.solver.simulate import simulate


def _model_at(graph, fraction: float):
    """The model at a budget ``fraction`` of the way from full checkpointing to none."""
    regions = candidate_regions(graph)
    full = simulate(graph, regions, {r.path: frozenset() for r in outermost(regions)}).peak_bytes
    budget = int(full + fraction * (graph.baseline_peak_bytes - full))
    return regions, budget, cpsat.build(graph, regions, scale_to=budget)


@pytest.mark.parametrize("name", ["gpt2", "llama", "resnet"])
def test_evaluate_is_what_cp_sat_computes(traced, name):
    """Random plans: every row, the cost and every variable CP-SAT derives from the decisions match
    ``evaluate``, which is also a complete hint CP-SAT accepts as it is."""
    _, _, graph = traced(name)
    regions, budget, model = _model_at(graph, 0.5)
    rng = random.Random(0)
    for _ in range(3):
        saved = {
            j: frozenset(p for p in r.choices if rng.random() < 0.3)
            for j, r in enumerate(regions)
            if r in outermost(regions) and rng.random() < 0.7
        }
        ev = model.evaluate(saved)
        m = model.m.clone()
        peak = m.get_int_var_from_proto_index(model.peak.index)
        for base, e, _ in model.row_exprs:
            m.add(base + e <= peak)
        m.minimize(peak)
        for index, value in ev.values.items():
            m.add_hint(m.get_int_var_from_proto_index(index), value)
        solver = cp_model.CpSolver()
        solver.parameters.fix_variables_to_their_hinted_value = True
        solver.parameters.num_workers = 1
        assert solver.solve(m) == cp_model.OPTIMAL
        assert [base + (e if isinstance(e, int) else solver.value(e)) for base, e, _ in model.row_exprs] == ev.rows
        assert solver.value(model.cost) == ev.cost
        assert ev.values[model.peak.index] == max(ev.rows) == solver.value(peak)


@pytest.mark.parametrize("name", ["gpt2", "llama", "resnet"])
@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.75])
def test_first_plan_fits_and_is_bounded_by_the_optimum(traced, name, fraction):
    """Where a first plan is found: it fits every row and the simulator's peak, it costs at least CP-SAT's
    proven optimum, and its bound is at most that optimum. On the transformer chains it is found, within
    1% of the optimum, and within 10% at the budget nearest full checkpointing: there several rows bind
    (docs/benchmarks.md, "Planning a 7B model"), and each checkpoint call's fixed cost makes which layer takes which
    configuration matter (tiny Llama at 0.25: 5.8%). CP-SAT's search from it reaches the optimum."""
    _, _, graph = traced(name)
    regions, budget, model = _model_at(graph, fraction)
    capacity = budget // model.unit
    start = primal.first_plan(model, capacity, gap=0.0)
    optimum = model.solve(budget_bytes=budget, time_limit_s=60, hint=None, first_plan=False)
    assert optimum.status is cpsat.Status.OPTIMAL
    assert start.bound <= optimum.objective_ns
    if name != "resnet":
        assert start.saved is not None and start.cost <= (1.10 if fraction == 0.25 else 1.01) * optimum.objective_ns
        searched = model.solve(budget_bytes=budget, time_limit_s=60, hint=None)  # the default: from the first plan
        assert searched.status is cpsat.Status.OPTIMAL and searched.objective_ns == optimum.objective_ns
    if start.saved is None:
        return
    assert all(ops <= set(regions[j].choices) for j, ops in start.saved.items())  # only ops free to be saved
    assert max(model.evaluate(start.saved).rows) <= capacity
    sim = simulate(graph, regions, {regions[j].path: ops for j, ops in start.saved.items()})
    assert sim.peak_bytes <= budget and sim.extra_cost_ns == start.cost
    assert start.cost >= optimum.objective_ns


def test_the_work_limit_stops_rounds_before_they_start(traced):
    """A work limit below one round's cells: the first round runs (nothing predicts it), no second one."""
    _, _, graph = traced("llama")
    _, budget, model = _model_at(graph, 0.25)
    unlimited = primal.first_plan(model, budget // model.unit, gap=0.0)
    limited = primal.first_plan(model, budget // model.unit, gap=0.0, work_limit=1)
    assert unlimited.rounds > 1  # two rows bind here
    assert limited.rounds == 1 and 0 < limited.work < unlimited.work
    assert primal.first_plan(model, budget // model.unit, gap=0.0, work_limit=1) == limited  # deterministic


class _FakeClock:
    """bound.clock for a test: reads 0 until ``reads`` reads, then 2 (past a deadline at 1)."""

    def __init__(self, reads: float) -> None:
        self.reads, self.count = reads, 0

    def __call__(self) -> float:
        self.count += 1
        return 0.0 if self.count <= self.reads else 2.0


def test_the_first_plan_stops_at_its_deadline_inside_a_row(traced, monkeypatch):
    """Issue 34: the first plan was bounded by its predicted work only (HF CLIP: 43 s in it under a 30 s
    limit). Past the deadline the row being solved stops, none starts, and the best plan so far comes back;
    before it, the clock changes nothing."""
    _, _, graph = traced("llama")
    _, budget, model = _model_at(graph, 0.25)
    capacity = budget // model.unit
    unlimited = primal.first_plan(model, capacity, gap=0.0)
    never = _FakeClock(math.inf)
    monkeypatch.setattr(bound, "clock", never)
    assert primal.first_plan(model, capacity, gap=0.0, deadline=1.0) == unlimited  # deterministic before it
    assert never.count > 4 * unlimited.rounds  # read inside the rows, not only between them
    passed = primal.first_plan(model, capacity, gap=0.0, deadline=-1.0)
    assert passed.saved is None and passed.rounds == passed.work == 0
    for reads in (1, 2, 3):  # the deadline passes inside the first row
        monkeypatch.setattr(bound, "clock", _FakeClock(reads))
        stopped = primal.first_plan(model, capacity, gap=0.0, deadline=1.0)
        assert stopped.saved is None and stopped.work == 0 and stopped.rounds <= 1


def test_a_row_past_its_deadline_gives_nothing(traced, monkeypatch):
    _, _, graph = traced("gpt2")
    _, budget, model = _model_at(graph, 0.5)
    row = model.row_form(max(range(len(model.row_exprs)), key=lambda i: model.row_exprs[i][2]))
    args = (model.regions, row, budget // model.unit, model.cost_form)
    assert bound.solve_row(*args, plan=True) is not None
    monkeypatch.setattr(bound, "clock", _FakeClock(1))
    assert bound.solve_row(*args, plan=True, deadline=1.0) is None
    assert bound.lower_bound(*args, deadline=1.0) is None


def test_a_search_ended_without_a_plan_returns_the_first_plan(traced, monkeypatch):
    """Issue 34: when the search's time ran out before CP-SAT found a plan, the first plan (which fits every
    row) was dropped and the answer was SolverTimeout. It is the answer, feasible, with the knapsack's bound."""
    _, _, graph = traced("llama")
    _, budget, model = _model_at(graph, 0.25)
    start = primal.first_plan(model, budget // model.unit, gap=0.0)
    assert start.saved is not None and start.bound < start.cost  # found, not proven optimal

    def out_of_time(self, m, *args, **kwargs):
        return cpsat.Solution(
            status=cpsat.Status.UNKNOWN,
            saved={},
            objective_ns=0,
            bound_ns=0,
            wall_s=1.0,
            deterministic_s=0.5,
            num_variables=0,
            num_constraints=0,
        )

    monkeypatch.setattr(cpsat._Model, "_search_branches", out_of_time)
    sol = model.solve(budget_bytes=budget, time_limit_s=60, hint=None)
    assert sol.status is cpsat.Status.FEASIBLE and sol.saved == model._paths(start.saved)
    assert sol.objective_ns == start.cost and sol.bound_ns == start.bound and 0 < sol.gap < 1


@pytest.mark.parametrize("name", ["unet", "resnet"])
def test_the_model_and_the_simulator_agree_on_pairs_of_decisions(traced, name):
    """CP-SAT's memory rows and the simulator are two accounts of the same lifetimes: for every pair of
    candidates in one block (checkpoints and rematerializations, nothing nested), with nothing saved and
    with random ops saved, the model's peak is the simulator's, up to the model's rounding of one unit per
    term. A lifetime rule added to one account only (a U-Net block's checkpoint beside a
    rematerialization once differed by 0.5 MB) fails here."""
    from ckptplan.shapes import candidates

    _, _, graph = traced(name)
    regions = candidates(graph)
    model = cpsat.build(graph, regions, scale_to=graph.baseline_peak_bytes)
    slack = len(model.terms[0][0]) * model.unit

    def block(path: str) -> str:
        parts = path.split(".")
        return ".".join(parts[: next((i + 1 for i, x in enumerate(parts) if x.isdigit()), 1)])

    rng = random.Random(0)
    for a in range(len(regions)):
        for b in range(a + 1, len(regions)):
            pa, pb = regions[a].path, regions[b].path
            if block(pa) != block(pb) or pb.startswith(pa + ".") or pa.startswith(pb + "."):
                continue
            for saved in (
                {a: frozenset(), b: frozenset()},
                {j: frozenset(p for p in regions[j].choices if rng.random() < 0.3) for j in (a, b)},
            ):
                try:
                    sim = simulate(graph, regions, {regions[j].path: ops for j, ops in saved.items()}).peak_bytes
                except ValueError:  # two recipes dropping one storage: not a plan
                    continue
                modelled = max(model.evaluate(saved).rows) * model.unit
                assert sim <= modelled <= sim + slack, (pa, pb, sim, modelled)
