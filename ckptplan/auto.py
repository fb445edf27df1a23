"""One call for a training script: ``handle = ckptplan.auto(model, *example_args, budget="8GB")``.

Traces one training step on the example inputs (real tensors plan for their own device: a CPU model gets a
CPU plan, a CUDA model a CUDA plan; meta or fake tensors plan for a GPU, as ``trace`` does), solves for the
budget, applies the plan and logs the answer in one INFO line: memory saved, predicted peak against the
budget, the estimated step-time cost and the extra forward FLOPs.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from .errors import InputError
from .plan import Plan
from .planner import solve
from .runtime import Handle, apply
from .trace import LossFn, trace
from .units import format_bytes

log = logging.getLogger("ckptplan")

# backward runs about twice the forward's FLOPs (two matmuls per forward matmul): the step estimate that
# the recompute time is compared with is three forwards
STEP_PER_FORWARD = 3


def optimizer_name(optimizer: Any) -> str | None:
    """The optimizer ``trace`` prices the state of: a name ("adamw") as is, or a ``torch.optim``
    optimizer by its class (SGD with momentum keeps one buffer per parameter: "momentum")."""
    if optimizer is None or isinstance(optimizer, str):
        return optimizer
    name = type(optimizer).__name__.lower()
    if name == "sgd":
        momentum = any(g.get("momentum", 0) for g in getattr(optimizer, "param_groups", []))
        return "momentum" if momentum else "sgd"
    return name  # trace refuses an optimizer it has no state size for, naming the ones it knows


def summary(plan: Plan, *, forward_cost_ns: int = 0) -> str:
    """The plan's answer in one line: 'saves 1.20 GiB (peak 3.10 GiB of budget 4.00 GiB, 4.30 GiB without
    checkpointing); +8.2% estimated step time, +31.0% forward FLOPs; 12 regions checkpointed'
    (and 'N tensors rematerialized' where the plan rebuilds some)."""
    budget = format_bytes(plan.budget_bytes)
    baseline = format_bytes(plan.baseline_peak_bytes)
    if not plan.regions:
        return f"fits without checkpointing: peak {baseline} within budget {budget}; no region checkpointed"
    saved = plan.baseline_peak_bytes - plan.predicted_peak_bytes
    remats = sum(r.remat for r in plan.regions)
    what = f"{len(plan.regions) - remats} regions checkpointed" + (
        f", {remats} tensors rematerialized" if remats else ""
    )
    cost = []
    if forward_cost_ns > 0:
        cost.append(f"+{100 * plan.extra_cost_ns / (STEP_PER_FORWARD * forward_cost_ns):.1f}% estimated step time")
    cost.append(f"+{100 * plan.extra_forward_fraction:.1f}% forward FLOPs")
    return (
        f"saves {format_bytes(saved)} (peak {format_bytes(plan.predicted_peak_bytes)} of budget {budget}, "
        f"{baseline} without checkpointing); {', '.join(cost)}; {what}"
    )


def auto(
    model: nn.Module,
    *example_args: Any,
    budget: int | str,
    loss_fn: LossFn | None = None,
    optimizer: Any = None,
    time_limit_s: float = 30.0,
    **example_kwargs: Any,
) -> Handle:
    """Plan and apply activation checkpointing for ``model`` under ``budget``; returns the ``Handle``.

        handle = ckptplan.auto(model, input_ids, labels=input_ids, budget="8GB", optimizer=opt)
        ...train...
        handle.remove()

    ``example_args``/``example_kwargs`` are one batch as the training loop passes it (the plan holds for
    that input shape). ``loss_fn`` maps the output to the loss (default: ``out.loss`` or the output's sum).
    ``optimizer``: a ``torch.optim`` optimizer or its name ("adamw"), whose state the budget then includes.
    A budget at or above the unplanned peak returns a handle with an empty plan (nothing checkpointed).
    Raises ``InfeasibleBudget`` (with the lowest budget that fits) when no plan fits.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"auto() needs an nn.Module, got {type(model).__name__}")
    if not isinstance(time_limit_s, (int, float)) or isinstance(time_limit_s, bool) or time_limit_s <= 0:
        raise InputError(f"time_limit_s must be a positive number of seconds, got {time_limit_s!r}")
    graph = trace(model, *example_args, loss_fn=loss_fn, optimizer=optimizer_name(optimizer), **example_kwargs)
    plan = solve(graph, budget, time_limit_s=time_limit_s)
    handle = apply(model, plan)
    log.info("ckptplan.auto: %s", summary(plan, forward_cost_ns=graph.forward_cost_ns))
    return handle
