"""The first plan (solver/primal.py): fits every row, never beats CP-SAT's proven optimum, and its bound
never exceeds it; the model's own evaluation of a plan (``_Model.evaluate``) is CP-SAT's."""

from __future__ import annotations

import random

import pytest
from ortools.sat.python import cp_model

from ckptplan.solver import cpsat, primal
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
        saved = {j: frozenset(p for p in r.choices if rng.random() < 0.3)
                 for j, r in enumerate(regions) if r in outermost(regions) and rng.random() < 0.7}
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
    (README, "Planning a 7B model"), and each checkpoint call's fixed cost makes which layer takes which
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
