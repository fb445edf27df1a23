"""ckptplan.auto: trace, solve and apply in one call, with the answer logged in human units."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import ckptplan
from ckptplan.auto import optimizer_name

import gpt2  # examples/, on sys.path by conftest


def grads(model, args):
    """Parameter gradients of one step from a fixed RNG seed (dropout masks identical between runs)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1234)
    model(*args).backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


@pytest.fixture(scope="module")
def tiny():
    model, args = gpt2.gpt2_tiny(batch_size=2, seq_len=64)
    return model, args, grads(copy.deepcopy(model), args)


def test_auto_keeps_gradients_and_remove_restores(tiny, caplog):
    model, args, want = tiny
    graph = ckptplan.trace(model, *args)
    with pytest.raises(ckptplan.InfeasibleBudget) as e:
        ckptplan.solve(graph, 1, time_limit_s=20)
    budget = (e.value.minimum_bytes + graph.baseline_peak_bytes) // 2  # between the minimum and no plan
    with caplog.at_level(logging.INFO, logger="ckptplan"):
        handle = ckptplan.auto(model, *args, budget=budget, time_limit_s=20)
    try:
        assert handle.plan.regions, "a budget below the unplanned peak checkpoints something"
        assert handle.plan.predicted_peak_bytes <= budget
        got = grads(model, args)
        assert handle.stats.extra_forward_flops > 0  # the plan ran: regions were recomputed
        assert got.keys() == want.keys()
        for name in want:
            assert torch.equal(got[name], want[name]), name
        line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("ckptplan.auto"))
        assert "saves " in line and "without checkpointing" in line and "% estimated step time" in line
        assert "% forward FLOPs" in line and ("GiB" in line or "MiB" in line) and "regions checkpointed" in line
    finally:
        handle.remove()
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert ckptplan.runtime.Handle.of(model) is None
    small = tuple(a[:1] for a in args)  # another shape runs once the plan is removed
    model(*small).backward()
    model.zero_grad(set_to_none=True)


def test_auto_budget_above_peak_fits_without_checkpointing(tiny, caplog):
    model, args, _ = tiny
    with caplog.at_level(logging.INFO, logger="ckptplan"):
        handle = ckptplan.auto(model, *args, budget="1GiB")
    try:
        assert handle.plan.regions == ()
        assert any("fits without checkpointing" in r.getMessage() for r in caplog.records)
    finally:
        handle.remove()


def test_auto_counts_the_optimizer_state(tiny):
    model, args, _ = tiny
    opt = torch.optim.AdamW(model.parameters())
    handle = ckptplan.auto(model, *args, budget="1GiB", optimizer=opt)
    try:
        assert handle.plan.optimizer == "adamw"
    finally:
        handle.remove()
    assert optimizer_name(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)) == "momentum"
    assert optimizer_name(torch.optim.SGD(model.parameters(), lr=0.1)) == "sgd"


def test_auto_infeasible_budget_says_the_minimum(tiny):
    model, args, _ = tiny
    with pytest.raises(ckptplan.InfeasibleBudget, match="minimum"):
        ckptplan.auto(model, *args, budget=1024, time_limit_s=10)
    assert ckptplan.runtime.Handle.of(model) is None


def test_auto_refuses_bad_input(tiny):
    model, args, _ = tiny
    with pytest.raises(ckptplan.InputError, match="nn.Module"):
        ckptplan.auto(lambda x: x, *args, budget="1GiB")
    with pytest.raises(ckptplan.InputError, match="time_limit_s"):
        ckptplan.auto(model, *args, budget="1GiB", time_limit_s=0)
    with pytest.raises(ckptplan.InputError, match="optimizer"):
        ckptplan.auto(model, *args, budget="1GiB", optimizer="lion")
