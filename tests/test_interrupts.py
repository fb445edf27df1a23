"""A step interrupted anywhere leaves nothing behind; a planned model copies and pickles; hand edits are
refused on load and on apply."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

import ckptplan
from ckptplan.plan import Decision, dump_yaml
from ckptplan.runtime import Handle

import gpt2
import resnet
from .conftest import ROOT, assert_same, grads_after  # noqa: F401 - ROOT puts examples/ on sys.path


def _gpt2():
    return gpt2.gpt2_tiny(batch_size=4, seq_len=64)


def _resnet():
    return resnet.resnet_tiny(batch_size=8)


# gpt2 at 60% by FLOPs saves ops in some regions (selective checkpointing) and rematerializes others;
# resnet at 60% has plain regions and rematerializations anchored at leaf convolutions
CASES = {"gpt2": (_gpt2, "60%", "flops"), "resnet": (_resnet, "60%", "time")}


@pytest.fixture(scope="module", params=sorted(CASES))
def planned(request):
    factory, budget, objective = CASES[request.param]
    torch.manual_seed(0)
    model, args = factory()
    plan = ckptplan.solve(ckptplan.trace(model, *args), budget, objective=objective)
    reference = step_grads(model, args)
    return model, args, plan, reference


def step_grads(model, args) -> dict[str, torch.Tensor]:
    return grads_after(model, lambda: model(*args).float().pow(2).mean())


def nothing_pushed() -> None:
    assert _get_current_dispatch_mode_stack() == []
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None


def test_both_cases_cover_what_they_claim(planned):
    _, _, plan, _ = planned
    assert any(r.remat for r in plan.regions) and any(not r.remat for r in plan.regions)
    if plan.model == "gpt2_tiny":
        assert any(o.decision is Decision.SAVE for r in plan.regions if not r.remat for o in r.ops)


def _inner_module(model, plan, remat: bool):
    """A module where the interrupt fires: the anchor of a rematerialization, or a region's last submodule."""
    from ckptplan.graph import parse_path

    region = next(r for r in plan.regions if r.remat == remat)
    path = parse_path(region.path)[0] if remat else region.path
    return model.get_submodule(path) if remat else list(model.get_submodule(path).modules())[-1]


class Interrupt(BaseException):
    """Stands in for KeyboardInterrupt (which pytest would take as the user's)."""


@pytest.mark.parametrize("exc", [Interrupt, RuntimeError])
@pytest.mark.parametrize("where", ["forward-remat", "forward-region", "backward-region"])
def test_an_interrupted_step_leaves_nothing_and_the_next_trains_bitwise(planned, where, exc):
    model, args, plan, reference = planned
    module = _inner_module(model, plan, remat=where == "forward-remat")
    original = module.forward

    def raising(*a, **k):
        out = original(*a, **k)
        if where.startswith("backward"):
            out.register_hook(lambda g: (_ for _ in ()).throw(exc("stop")))
            return out
        raise exc("stop")

    handle = ckptplan.apply(model, plan)
    try:
        module.forward = raising
        with pytest.raises(exc):
            step_grads(model, args)
        del module.forward
        nothing_pushed()
        assert_same(reference, step_grads(model, args))
        nothing_pushed()
    finally:
        module.__dict__.pop("forward", None)
        handle.remove()
    assert "forward" not in model.__dict__ and Handle.of(model) is None
    assert_same(reference, step_grads(model, args))


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_a_planned_model_copies_with_a_working_plan_of_its_own(planned, how):
    model, args, plan, reference = planned
    with ckptplan.apply(model, plan) as handle:
        step_grads(model, args)  # a step has run: the copy must not share its in-flight state
        unplanned_state = {k: v.clone() for k, v in model.state_dict().items()}  # keys as without a plan
        if how == "deepcopy":
            clone = copy.deepcopy(model)
        else:
            buf = io.BytesIO()
            torch.save(model, buf)
            buf.seek(0)
            clone = torch.load(buf, weights_only=False)
        assert clone.state_dict().keys() == unplanned_state.keys()
        assert all(torch.equal(clone.state_dict()[k], v) for k, v in unplanned_state.items())
        theirs = Handle.of(clone)
        assert theirs is not None and theirs is not handle and theirs.model is clone
        steps = theirs.stats.steps
        assert_same(reference, step_grads(clone, args))
        assert theirs.stats.steps == steps + 1 and theirs.stats.extra_forward_flops == plan.extra_forward_flops
        assert_same(reference, step_grads(model, args))  # the original is untouched by the copy's step
        theirs.remove()
        assert "forward" not in clone.__dict__ and Handle.of(clone) is None
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in clone.modules())
        assert_same(reference, step_grads(clone, args))
        assert_same(reference, step_grads(model, args))


# ---- hand edits: refused when the plan is loaded, and when a random op's output would be cached ----------
def test_load_refuses_a_random_op_flipped_to_save(tmp_path):
    model, args = _gpt2()
    plan = ckptplan.solve(ckptplan.trace(model, *args), "60%")
    text = dump_yaml(plan)
    line = next(row for row in text.splitlines() if '"recompute"' in row and row.endswith('"random"]'))
    path = tmp_path / "edited.yaml"
    path.write_text(text.replace(line, line.replace('"recompute"', '"save"'), 1))
    with pytest.raises(ckptplan.InputError, match=r"cannot be saved \(random\)"):
        ckptplan.load_plan(path)


def test_apply_refuses_to_cache_a_random_op_whatever_its_row_says():
    """The row's forced-by and FLOPs edited too, so that loading cannot tell: the first step refuses."""
    import dataclasses

    torch.manual_seed(0)
    model, args = _gpt2()
    plan = ckptplan.solve(ckptplan.trace(model, *args), "60%", objective="flops")
    region = next(
        r
        for r in plan.regions
        if not r.remat and any(o.decision is Decision.SAVE for o in r.ops) and any(o.forced == "random" for o in r.ops)
    )
    i = next(i for i, o in enumerate(region.ops) if o.forced == "random")
    ops = list(region.ops)
    ops[i] = dataclasses.replace(ops[i], decision=Decision.SAVE, forced=None, recompute_flops=0, recompute_ns=0)
    edited = plan.with_regions(
        tuple(dataclasses.replace(r, ops=tuple(ops)) if r is region else r for r in plan.regions)
    )
    with ckptplan.apply(model, edited):
        with pytest.raises(ckptplan.PlanMismatch, match="draws random numbers"):
            model(*args)
        nothing_pushed()
