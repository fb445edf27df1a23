"""A plan applied to a live model: memory, FLOPs and gradients measured against the plan's claims."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import ckptplan
from ckptplan.measure import measure_flops, measure_peak

from .conftest import solve_at

BUDGETS = [0.8, 0.6, 0.45]


class Runner:
    """Runs steps from the same parameters, buffers and RNG seed, so runs can be compared bitwise."""

    def __init__(self, model, args) -> None:
        self.model, self.args = model, args
        self.state = copy.deepcopy(model.state_dict())

    def reset(self) -> None:
        self.model.load_state_dict(self.state)
        self.model.zero_grad(set_to_none=True)
        torch.manual_seed(1234)

    def grads_and_buffers(self):
        self.reset()
        self.model(*self.args).backward()
        grads = {n: p.grad.clone() for n, p in self.model.named_parameters()}
        buffers = {n: b.clone() for n, b in self.model.named_buffers()}
        self.reset()
        return grads, buffers

    def peak(self) -> int:
        self.reset()
        try:
            return measure_peak(self.model, *self.args)
        finally:
            self.reset()

    def flops(self) -> int:
        self.reset()
        try:
            return measure_flops(self.model, *self.args)
        finally:
            self.reset()


@pytest.fixture(scope="module")
def reference(traced):
    """Per model: the no-plan gradients, buffers and step FLOPs."""
    cache = {}

    def get(name):
        if name not in cache:
            model, args, graph = traced(name)
            run = Runner(model, args)
            cache[name] = (run, *run.grads_and_buffers(), run.flops())
        return cache[name]

    return get


@pytest.mark.parametrize("fraction", BUDGETS)
@pytest.mark.parametrize("name", ["gpt2", "resnet", "llama", "unet"])
def test_plan_fits_measured_and_keeps_gradients(traced, reference, name, fraction):
    model, args, graph = traced(name)
    run, grads0, buffers0, flops0 = reference(name)
    plan = solve_at(graph, fraction)
    assert plan.predicted_peak_bytes <= plan.budget_bytes
    assert plan.regions, "a budget below the no-checkpointing peak must checkpoint something"

    handle = ckptplan.apply(model, plan)
    try:
        first = run.peak()  # the first step checks every region's ops under selective checkpointing
        grads, buffers = run.grads_and_buffers()  # later steps: regions that save nothing run plain
        stats_extra = handle.stats.extra_forward_flops
        flops = run.flops()
        later = run.peak()
    finally:
        handle.remove()

    # memory: under the budget, and the prediction within 10%, at the first step and later
    for measured in (first, later):
        assert measured <= plan.budget_bytes, f"measured {measured} > budget {plan.budget_bytes}"
        assert abs(measured - plan.predicted_peak_bytes) <= 0.10 * plan.predicted_peak_bytes
    # gradients and BatchNorm statistics: bitwise equal (dropout masks replayed from the same RNG)
    for k in grads0:
        assert torch.equal(grads[k], grads0[k]), f"gradient of {k} differs"
    for k in buffers0:
        assert torch.equal(buffers[k], buffers0[k]), f"buffer {k} differs"
    # FLOPs: what the runtime counted equals FlopCounterMode's difference, and the plan's prediction
    # (zero is possible: a plan may recompute only memory-bound ops, which the cost model charges)
    measured_extra = flops - flops0
    assert plan.extra_cost_ns > 0
    assert abs(stats_extra - measured_extra) <= 0.01 * measured_extra
    assert abs(plan.extra_forward_flops - measured_extra) <= 0.01 * measured_extra


def test_stats_log_one_line_per_step(traced, caplog):
    model, args, graph = traced("llama")
    plan = solve_at(graph, 0.6)
    with ckptplan.apply(model, plan) as handle, caplog.at_level(logging.INFO, logger="ckptplan"):
        for step in (1, 2):
            model.zero_grad(set_to_none=True)
            model(*args).backward()
            assert handle.stats.steps == step
            assert handle.stats.extra_forward_flops == plan.extra_forward_flops
        assert handle.stats.total_extra_forward_flops == 2 * plan.extra_forward_flops
        assert handle.stats.forward_flops == graph.forward_flops
    lines = [r for r in caplog.records if r.name == "ckptplan" and "step" in r.getMessage()]
    assert len(lines) == 2


def test_remove_restores_plain_behaviour(traced):
    model, args, graph = traced("gpt2")
    plan = solve_at(graph, 0.6)
    handle = ckptplan.apply(model, plan)
    wrapped = model.get_submodule(plan.regions[0].path)
    assert "forward" in wrapped.__dict__
    handle.remove()
    assert "forward" not in wrapped.__dict__
    assert not model._forward_pre_hooks and not model._forward_hooks
    # a shape the plan was not made for runs again once the plan is removed
    small = tuple(a[:2] for a in args)
    model(*small).backward()
    model.zero_grad(set_to_none=True)


def test_apply_refuses_another_model(traced):
    _, _, graph = traced("gpt2")
    other, _, _ = traced("llama")
    plan = solve_at(graph, 0.6)
    with pytest.raises(ckptplan.PlanMismatch, match="transformer"):
        ckptplan.apply(other, plan)


def test_apply_refuses_same_structure_other_width(traced):
    import gpt2

    _, _, graph = traced("gpt2")
    plan = solve_at(graph, 0.6)
    wider, _ = gpt2.build(gpt2.GPTConfig(n_layer=4, n_head=4, n_embd=64, vocab_size=512, block_size=128))
    with pytest.raises(ckptplan.PlanMismatch, match="parameters"):
        ckptplan.apply(wider, plan)


def test_runtime_refuses_another_shape(traced):
    model, args, graph = traced("gpt2")
    plan = solve_at(graph, 0.6)
    with ckptplan.apply(model, plan):
        with pytest.raises(ckptplan.PlanMismatch, match=r"int64\[2, 128\]"):
            model(*(a[:2] for a in args))
    model.zero_grad(set_to_none=True)


def test_runtime_detects_another_path_before_backward(traced):
    """A flag that changes the op sequence inside a region (attention dropout off: the CPU takes its flash
    kernel instead of the math path) is caught in forward, and the plan says where."""
    model, args, graph = traced("gpt2")
    plan = solve_at(graph, 0.6)
    attns = [m for m in model.modules() if type(m).__name__ == "CausalSelfAttention"]
    assert attns
    with ckptplan.apply(model, plan):
        for m in attns:
            m.dropout = 0.0
        try:
            with pytest.raises(ckptplan.PlanMismatch, match=r"op #\d+"):
                model(*args)
        finally:
            for m in attns:
                m.dropout = 0.1
    model.zero_grad(set_to_none=True)


def test_eval_mode_with_gradients_runs_without_the_plan(traced):
    """model.eval() with gradients on (a validation loss without no_grad): the plan steps aside."""
    model, args, graph = traced("gpt2")
    plan = solve_at(graph, 0.6)
    with ckptplan.apply(model, plan) as handle:
        model.eval()
        try:
            model(*args).backward()
        finally:
            model.train()
        assert handle.stats.recomputed_regions == 0
    model.zero_grad(set_to_none=True)


def test_no_grad_forward_ignores_the_plan(traced):
    model, args, graph = traced("resnet")
    plan = solve_at(graph, 0.6)
    with ckptplan.apply(model, plan), torch.no_grad():
        model.eval()
        try:
            out = model(*args)
        finally:
            model.train()
    assert out.dim() == 0


def test_extra_dispatch_modes_do_not_shift_decisions(traced, reference):
    """A profiler and FlopCounterMode around the step change nothing: same ops seen, same gradients."""
    from torch.profiler import profile
    from torch.utils.flop_counter import FlopCounterMode

    model, args, graph = traced("gpt2")
    run, grads0, _, _ = reference("gpt2")
    plan = solve_at(graph, 0.6)
    with ckptplan.apply(model, plan) as handle:
        run.reset()
        with profile(), FlopCounterMode(display=False):
            model(*args).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        assert handle.stats.extra_forward_flops == plan.extra_forward_flops
    run.reset()
    for k in grads0:
        assert torch.equal(grads[k], grads0[k]), k


def test_a_model_with_frozen_parameters_is_measured_and_fits_to_the_byte():
    """MemTracker hooks every parameter's gradient; a frozen one (an embedding, as Whisper's positions)
    must be counted without a hook, not end `verify` in a traceback."""
    from torch import nn

    class Frozen(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(100, 64)
            self.blocks = nn.ModuleList(
                nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)) for _ in range(4)
            )

        def forward(self, x):
            h = self.emb(x)
            for block in self.blocks:
                h = h + block(h)
            return h.pow(2).mean()

    torch.manual_seed(0)
    model = Frozen()
    model.emb.weight.requires_grad_(False)
    x = torch.randint(0, 100, (8, 64))
    graph = ckptplan.trace(model, x)
    assert measure_peak(model, x) == graph.baseline_peak_bytes
    plan = solve_at(graph, 0.7)
    assert plan.regions
    with ckptplan.apply(model, plan):
        assert measure_peak(model, x) == plan.predicted_peak_bytes


def test_each_step_logs_its_cost_and_the_plans_peak_in_human_units(traced, caplog):
    model, args, graph = traced("gpt2")
    plan = solve_at(graph, 0.6)
    with caplog.at_level(logging.INFO, logger="ckptplan"):
        with ckptplan.apply(model, plan) as handle:
            model(*args).backward()
            model.zero_grad(set_to_none=True)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("ckptplan step 1"))
    flops = ckptplan.units.format_flops(handle.stats.extra_forward_flops)
    assert flops in line and str(handle.stats.extra_forward_flops) not in line
    predicted, budget = ckptplan.format_bytes(plan.predicted_peak_bytes), ckptplan.format_bytes(plan.budget_bytes)
    assert f"plan peak {predicted} of {budget}" in line
