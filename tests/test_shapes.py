"""One plan for several input shapes (sequence lengths): decisions shared, peak fits at every shape."""

from __future__ import annotations

import copy

import pytest
import torch

import ckptplan
from ckptplan.measure import measure_flops, measure_peak


def build(seq_len: int):
    import gpt2

    return gpt2.gpt2_tiny(batch_size=8, seq_len=seq_len, block_size=128)  # one model for every length


@pytest.fixture(scope="module")
def multi():
    models = {n: build(n) for n in (64, 128)}
    graphs = [ckptplan.trace(m, *a) for m, a in models.values()]
    return models, graphs, ckptplan.solve(graphs, "60%")


def test_plan_holds_for_every_listed_shape(multi):
    models, graphs, plan = multi
    assert [list(x) for x in plan.shapes] == [["int64[8, 128]"] * 2, ["int64[8, 64]"] * 2]  # largest first
    for g in graphs:  # the simulator, shape by shape
        assert ckptplan.check_plan(g, plan).peak_bytes <= plan.budget_bytes
    model, _ = models[128]
    state = copy.deepcopy(model.state_dict())
    for n in (64, 128):
        _, args = models[n]
        model.load_state_dict(state)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        model(*args).backward()
        reference = {k: p.grad.clone() for k, p in model.named_parameters()}
        with ckptplan.apply(model, plan) as handle:
            model.zero_grad(set_to_none=True)
            torch.manual_seed(3)
            model(*args).backward()
            for k, p in model.named_parameters():
                assert torch.equal(p.grad, reference[k]), (n, k)
            assert handle.stats.extra_forward_flops > 0
            model.zero_grad(set_to_none=True)
            assert measure_peak(model, *args) <= plan.budget_bytes
            model.zero_grad(set_to_none=True)
            with_plan = measure_flops(model, *args)  # a later step: regions that save nothing may run plain
            paid = handle.stats.extra_forward_flops
        model.zero_grad(set_to_none=True)
        assert paid == with_plan - measure_flops(model, *args), n  # the FLOPs paid at this shape
        model.zero_grad(set_to_none=True)


def test_unlisted_shape_is_refused_naming_it(multi):
    models, _, plan = multi
    model, _ = models[128]
    _, args = build(96)
    with ckptplan.apply(model, plan), pytest.raises(ckptplan.PlanMismatch, match=r"int64\[8, 96\]"):
        model(*args)
    model.zero_grad(set_to_none=True)


def test_shapes_of_different_models_are_refused():
    import gpt2

    graphs = []
    for n in (64, 128):  # without block_size, the position table follows the length: another model
        model, args = gpt2.gpt2_tiny(batch_size=8, seq_len=n)
        graphs.append(ckptplan.trace(model, *args))
    with pytest.raises(ckptplan.InputError, match="parameters or buffers differ"):
        ckptplan.solve(graphs, "60%")
