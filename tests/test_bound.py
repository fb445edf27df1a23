"""The knapsack bound (solver/bound.py): exact on one row where nothing is relaxed, never above an optimum."""

from __future__ import annotations

import time
from itertools import combinations, product

import pytest
import torch

import ckptplan
import ckptplan.shapes
from ckptplan.solver import bound, callbacks, cpsat, families
from ckptplan.solver.linear import LinearForm
from ckptplan.solver.regions import candidate_regions, nested_pairs, outermost
from ckptplan.solver.simulate import simulate

from .test_compare import _Chain


def _brute_force(regions, row: LinearForm, capacity: int, cost: LinearForm) -> int | None:
    """The least cost over every decision (checkpoint sets with no nesting, every subset of saved ops)
    whose row value fits ``capacity``; z terms at the least value their constraint allows."""
    nested = set(nested_pairs(regions))
    best = None
    for n in range(len(regions) + 1):
        for on in combinations(range(len(regions)), n):
            if any((a, b) in nested for a in on for b in on):
                continue
            ops = [(j, p) for j in on for p in regions[j].choices]
            for flags in product((0, 1), repeat=len(ops)):
                k = {op for op, f in zip(ops, flags) if f}
                weight = row.constant + sum(row.c.get(j, 0) for j in on) + sum(row.k.get(op, 0) for op in k)
                for (j, p, holder, forced), a in row.z.items():
                    recomputed = j in on and (forced or (j, p) not in k)
                    at_least = int(recomputed and holder in on)
                    weight += a * (at_least if a > 0 else 1)
                if weight > capacity:
                    continue
                value = (
                    sum(cost.c.get(j, 0) for j in on)
                    + sum(cost.k.get(op, 0) for op in k)
                    + sum(a for j, a in cost.s.items() if any(op[0] == j for op in k))
                )
                best = value if best is None else min(best, value)
    return best


def test_bound_is_exact_on_one_row_of_a_small_chain():
    """One family, integer weights at bucket size 1: the dynamic program is the row's exact optimum."""
    torch.manual_seed(0)
    model = _Chain(2, 16)
    graph = ckptplan.trace(model, torch.randn(4, 32, 16))
    regions = candidate_regions(graph)
    model_ = cpsat.build(graph, regions, scale_to=graph.baseline_peak_bytes)
    assert model_.unit == 1 and len(outermost(regions)) == 1  # the Sequential holds both blocks
    cost = model_.cost_form
    checked = 0
    for i, (_, _, ub) in enumerate(model_.row_exprs):
        row = model_.row_form(i)
        low = row.constant + sum(min(0, a) for a in [*row.c.values(), *row.k.values(), *row.z.values()])
        for capacity in sorted({low, (low + ub) // 2, ub - 1}):
            expected = _brute_force(regions, row, capacity, cost)
            got = bound.lower_bound(regions, row, capacity, cost)
            if expected is None:
                assert got is None
            else:
                assert got == expected, (i, capacity)
                checked += 1
    assert checked >= 10


@pytest.mark.parametrize(("name", "strong"), [("gpt2", True), ("llama", True), ("resnet", False)])
def test_bound_never_exceeds_the_optimum(traced, name, strong):
    """Every memory row's bound is at most the proven optimum of the whole model. On the transformer
    chains one row binds, and its bound is close to the optimum; ResNet has several binding rows."""
    _, _, graph = traced(name)
    regions = candidate_regions(graph)
    full = simulate(graph, regions, {r.path: frozenset() for r in outermost(regions)}).peak_bytes
    budget = (full + graph.baseline_peak_bytes) // 2
    model = cpsat.build(graph, regions, scale_to=budget)
    solution = model.solve(budget_bytes=budget, time_limit_s=60, hint=None, first_plan=False)  # CP-SAT's proof
    assert solution.status is cpsat.Status.OPTIMAL
    capacity = budget // model.unit
    cost = model.cost_form
    bounds = [
        bound.lower_bound(regions, model.row_form(i), capacity, cost)
        for i, (_, _, ub) in enumerate(model.row_exprs)
        if ub > capacity
    ]
    assert bounds and all(b is None or b <= solution.objective_ns for b in bounds)
    assert max(b or 0 for b in bounds) > (0.9 if strong else 0.5) * solution.objective_ns


def test_with_costs_shared_by_rematerializations_the_bound_never_exceeds_the_optimum():
    """Rematerializations share their module call's recipe mode and the saved-tensor hook: the bound
    branches on the hook and spreads the rest, and stays at most the proven optimum. The branched search's
    plan costs what the simulator charges it, and no more than the best plan without rematerializations."""
    torch.manual_seed(0)
    graph = ckptplan.trace(_Chain(2, 16), torch.randn(4, 32, 16))
    regions = ckptplan.shapes.candidates(graph)
    assert any(r.remat for r in regions)
    full = simulate(graph, regions, {r.path: frozenset() for r in outermost(regions)}).peak_bytes
    checked = 0
    for budget in (full, (full + graph.baseline_peak_bytes) // 2, graph.baseline_peak_bytes - 1):
        model = cpsat.build(graph, regions, scale_to=budget)
        assert model.cost_form.shared and model.hook is not None
        solution = model.solve(budget_bytes=budget, time_limit_s=60, hint=None, first_plan=False)
        assert solution.status is cpsat.Status.OPTIMAL
        assert simulate(graph, regions, solution.saved).extra_cost_ns == solution.objective_ns
        plain = candidate_regions(graph)
        without = cpsat.build(graph, plain, scale_to=budget).solve(budget_bytes=budget, time_limit_s=60, hint=None)
        assert without.status is cpsat.Status.OPTIMAL and solution.objective_ns <= without.objective_ns
        capacity = budget // model.unit
        for i, (_, _, ub) in enumerate(model.row_exprs):
            if ub > capacity:
                b = bound.lower_bound(regions, model.row_form(i), capacity, model.cost_form)
                assert b is None or b <= solution.objective_ns
                checked += b is not None
    assert checked


def test_the_search_solves_no_bound_row_after_its_deadline(traced):
    """CP-SAT cannot stop while a callback runs: a check that starts once the search's wall-clock limit
    has passed solves no row (it would add its time to the limit), one before it does."""
    _, _, graph = traced("gpt2")
    regions = candidate_regions(graph)
    full = simulate(graph, regions, {r.path: frozenset() for r in outermost(regions)}).peak_bytes
    budget = (full + graph.baseline_peak_bytes) // 2
    model = cpsat.build(graph, regions, scale_to=budget)
    capacity = budget // model.unit

    class Solution:  # every variable at 1: some plan's cost and row values, as CP-SAT's callback gives them
        @staticmethod
        def value(expr) -> int:
            return 1

    late = callbacks.KnapsackCheck(model, capacity, 0.0, deadline=time.monotonic() - 1)
    assert late(Solution()) == (0, False) and not late.rows
    timely = callbacks.KnapsackCheck(model, capacity, 0.0)
    timely(Solution())
    assert timely.rows


def test_too_many_modes_are_refused_before_they_are_formed(monkeypatch):
    """Issue 34: a family of two wide subtrees (2,049 checkpoint sets each) formed their 4.2M unions before
    counting them; the first plan then spent seconds past the time limit (HF Whisper). The count is
    known before: no more than MAX_MODES sets are formed."""
    from itertools import product as real_product
    from types import SimpleNamespace

    paths = ["f"] + [f"f.{c}" for c in "ab"] + [f"f.{c}.{i}" for c in "ab" for i in range(11)]
    regions = tuple(SimpleNamespace(path=p) for p in paths)
    formed = []

    def counting(*its):
        formed.append(0)
        for pair in real_product(*its):
            formed[-1] += 1
            yield pair

    monkeypatch.setattr(families, "product", counting)
    assert families.checkpoint_sets(0, list(range(len(paths))), regions) is None  # 2,049 x 2,049 > MAX_MODES
    assert max(formed) <= families.MAX_MODES  # the sets of one node, at most


def test_a_family_config_walks_back_one_mode_only(monkeypatch):
    """Issue 34: the first plan's walk back kept every knapsack table of every mode of a family to pick
    one (HF BERT: 55 of 80 s of the first plan, past any time limit). The cheapest mode is found from
    last tables alone; only its tables are kept, and the configuration is the one the old walk found."""
    import random

    rng = random.Random(0)
    modes = [
        families.Mode(
            weight=rng.randrange(0, 400),
            cost=rng.randrange(1000, 5000),
            items=tuple((rng.randrange(1, 200), -rng.randrange(1, 900)) for _ in range(6)),
            own=6,
        )
        for _ in range(40)
    ]
    w_min, step = min(m.weight for m in modes), 7
    fine, size, _ = bound._fine(w_min, modes)
    end = int(bound._row_ends(fine, size, step, 31)[-1])
    # the old walk: the cheapest mode by every table of every mode, first on a tie
    lasts = [bound._knapsack(m, w_min, fine, size)[-1] for m in modes]
    want = min(range(len(modes)), key=lambda i: (float(lasts[i][: end + 1].min()), i))
    full = []
    real = bound._knapsack
    monkeypatch.setattr(bound, "_knapsack", lambda m, *a: (full.append(m) if m.items else None, real(m, *a))[1])
    index, taken, _ = bound._family_config(w_min, modes, step, 30)
    assert index == want and len(full) == 1
    f = int(lasts[index][: end + 1].argmin())
    chosen = modes[index]
    assert (chosen.weight - w_min) // fine + sum(chosen.items[i][0] // fine for i in taken) == f
    assert chosen.cost + sum(chosen.items[i][1] for i in taken) == lasts[index][f]
