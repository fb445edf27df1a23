"""ckptplan against the baseline policies, predicted: it is never worse where a baseline fits."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint_sequential

import ckptplan
from ckptplan.compare import sweep
from ckptplan.decisions import RESERVE_SCALE
from ckptplan.measure import measure_flops, measure_peak
from ckptplan.solver import baselines
from ckptplan.solver.regions import candidate_regions
from ckptplan.solver.simulate import simulate

from .test_cli import ARGS, GPT2, run


@pytest.mark.parametrize("name", ["gpt2", "llama", "resnet"])
def test_baselines_are_what_they_say(traced, name):
    _, _, graph = traced(name)
    regions = candidate_regions(graph)
    blocks = baselines.blocks(graph, regions)
    assert blocks and all(b.path.rsplit(".", 1)[1].isdigit() for b in blocks)
    full = baselines.evaluate(graph, regions, baselines.Policy.FULL)
    assert set(full.saved) == {b.path for b in blocks} and not any(full.saved.values())
    every2 = baselines.evaluate(graph, regions, baselines.Policy.EVERY_K, 2)
    assert sorted(every2.saved) == sorted(b.path for b in blocks[::2])
    # fewer checkpointed blocks: more memory, less recomputation
    assert full.peak_bytes <= every2.peak_bytes <= graph.baseline_peak_bytes
    assert every2.extra_forward_flops <= full.extra_forward_flops
    op_sac = baselines.evaluate(graph, regions, baselines.Policy.OP_SAC)
    for keep in op_sac.saved.values():
        assert all(graph.ops[p].name in baselines.SAVED_BY_OP_SAC for p in keep)
    assert op_sac.extra_forward_flops <= full.extra_forward_flops
    assert simulate(graph, regions, {}).peak_bytes == graph.baseline_peak_bytes


class _Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


class _Chain(nn.Module):
    """Blocks in a Sequential; ``segments`` > 0 runs them through ``checkpoint_sequential``."""

    def __init__(self, n: int, dim: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[_Block(dim) for _ in range(n)])
        self.segments = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.segments:
            return checkpoint_sequential(self.blocks, self.segments, x, use_reentrant=False)
        return self.blocks(x)


def test_sqrt_n_prediction_matches_checkpoint_sequential():
    """The predicted sqrt(n) baseline is what checkpoint_sequential measures: peak and extra FLOPs."""
    torch.manual_seed(0)
    model = _Chain(9, 64)
    x = torch.randn(16, 128, 64)
    graph = ckptplan.trace(model, x)
    regions = candidate_regions(graph)
    segments, count = baselines.sqrt_n_segments(graph, regions)
    # checkpoint_sequential(model, 3, x): blocks 0-2 and 3-5 checkpointed, 6-8 plain
    assert count == 3 and [s.members for s in segments] == [
        ("blocks.0", "blocks.1", "blocks.2"),
        ("blocks.3", "blocks.4", "blocks.5"),
    ]
    predicted = baselines.evaluate(graph, regions, baselines.Policy.SQRT_N)
    assert predicted.knob == "segments=3x3" and set(predicted.saved) == {"blocks.0..blocks.2", "blocks.3..blocks.5"}
    plain_peak, plain_flops = measure_peak(model, x), measure_flops(model, x)
    model.segments = count
    peak, flops = measure_peak(model, x), measure_flops(model, x)
    assert peak < plain_peak
    assert abs(predicted.peak_bytes - peak) <= 0.01 * peak, (predicted.peak_bytes, peak)  # equal here
    assert predicted.extra_forward_flops == flops - plain_flops


def test_sqrt_n_needs_a_chain(traced):
    _, _, graph = traced("unet")  # skip concatenations: blocks are not back to back on one tensor
    regions = candidate_regions(graph)
    assert baselines.sqrt_n_segments(graph, regions) == ((), 0)
    assert all(r.policy is not baselines.Policy.SQRT_N for r in baselines.all_baselines(graph, regions))


@pytest.mark.parametrize("fraction", [0.8, 0.6])
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_ckptplan_beats_every_fitting_baseline(traced, name, fraction):
    """Minimising time it has the lowest estimated time; minimising FLOPs, the fewest FLOPs. The one
    exception is sqrt(n) on time, where its segments are what fits: a segment is one checkpoint over
    several blocks, holding one input where the blocks checkpointed one by one hold one each, which a
    plan of module calls cannot express (gpt2 at 0.6: those blocks one by one peak above the budget)."""
    _, _, graph = traced(name)
    budget = int(fraction * graph.baseline_peak_bytes)
    by_time = ckptplan.solve(graph, budget, time_limit_s=600)  # never cut by the wall clock of a busy machine
    by_flops = ckptplan.solve(graph, budget, time_limit_s=600, objective="flops")
    assert by_time.objective == "time" and by_flops.objective == "flops"
    assert by_flops.extra_forward_flops <= by_time.extra_forward_flops
    assert by_time.extra_cost_ns <= by_flops.extra_cost_ns
    usable = budget * round((1 - by_time.reserve) * RESERVE_SCALE) // RESERVE_SCALE
    regions = candidate_regions(graph)
    results = baselines.all_baselines(graph, regions)
    fitting = [r for r in results if r.peak_bytes <= usable]
    assert fitting  # every_k or full fits at these budgets: the comparison is not empty
    for r in fitting:
        assert by_flops.extra_forward_flops <= r.extra_forward_flops, (r.policy, r.knob)
        if by_time.extra_cost_ns <= r.extra_cost_ns:
            continue
        assert r.policy is baselines.Policy.SQRT_N, (r.policy, r.knob)
        segments = {x.path: x for x in baselines.sqrt_n_segments(graph, regions)[0]}
        blocks = {m: frozenset() for path in r.saved for m in segments[path].members}
        assert simulate(graph, regions, blocks).peak_bytes > usable, "the same blocks, one by one, fit"


def test_flops_objective_round_trips_through_yaml(traced, tmp_path):
    _, _, graph = traced("gpt2")
    plan = ckptplan.solve(graph, "70%", objective="flops")
    again = ckptplan.load_plan(plan.save(tmp_path / "p.yaml"))
    assert again.objective == "flops" and again == plan
    with pytest.raises(ckptplan.InputError, match="objective"):
        ckptplan.solve(graph, "70%", objective="speed")


def test_sweep_cli_json_and_plot(tmp_path):
    png = tmp_path / "pareto.png"
    result = run("sweep", "-m", GPT2, *ARGS, "--budgets", "80%,65%,1MB", "--plot", str(png), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    rows = data["rows"]
    assert [r["budget"] for r in rows if r["policy"] == "ckptplan"] == ["80%", "65%", "1MB"]
    assert {r["policy"] for r in rows} == {"ckptplan", "none", "full", "every_k", "op_sac", "sqrt_n"}
    tiny = [r for r in rows if r["budget"] == "1MB"]
    assert not any(r["fits"] for r in tiny) and "minimum" in tiny[0]["note"]
    for budget in ("80%", "65%"):
        mine = next(r for r in rows if r["budget"] == budget and r["policy"] == "ckptplan")
        assert mine["fits"] and mine["peak_bytes"] <= mine["budget_bytes"]
        for r in rows:
            if r["budget"] == budget and r["fits"] and r["policy"] != "ckptplan":
                assert mine["extra_cost_ns"] <= r["extra_cost_ns"]
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("budgets", ["", "80%,8Gb", "lots"])
def test_sweep_bad_budgets_exit_2(budgets):
    result = run("sweep", "-m", GPT2, *ARGS, "--budgets", budgets)
    assert result.exit_code == 2, result.output
    assert "budget" in result.output.lower()


@pytest.mark.parametrize("name", ["gpt2", "resnet"])
def test_sweep_and_solve_agree_at_the_same_budget(traced, name):
    """Issue 32: a sweep's ckptplan row is the plan `solve` gives at that budget with the same limits (both
    end on CP-SAT's deterministic clock), not a cheaper or costlier one."""
    _, _, graph = traced(name)
    for budget in ("70%", "55%"):
        row = next(r for r in sweep(graph, [budget], time_limit_s=5) if r.policy == "ckptplan")
        plan = ckptplan.solve(graph, budget, time_limit_s=5)
        assert (row.peak_bytes, row.extra_cost_ns, row.extra_forward_flops) == (
            plan.predicted_peak_bytes,
            plan.extra_cost_ns,
            plan.extra_forward_flops,
        )
