"""``sweep``: ckptplan against the policies people use instead, at several budgets, all predicted.

For each budget, ckptplan's plan and the cheapest fitting knob of every baseline policy
(``solver/baselines.py``), each judged by the same simulator against the same usable bytes (the
budget less ckptplan's reserve). Nothing here runs the model: ``benchmarks/run.py`` measures.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .decisions import RESERVE_SCALE
from .errors import InfeasibleBudget, InputError
from .graph import Graph
from .planner import default_reserve, solve
from .solver import baselines
from .solver.regions import candidate_regions
from .units import format_bytes, parse_budget

CKPTPLAN = "ckptplan"


@dataclass(frozen=True, slots=True, kw_only=True)
class SweepRow:
    budget: str  # as given
    budget_bytes: int
    policy: str  # "ckptplan" or a baselines.Policy value
    knob: str  # "k=2", "" ...
    fits: bool  # a plan under the budget (less the reserve) exists for this policy
    peak_bytes: int | None  # predicted; None when nothing fits
    extra_forward_flops: int | None
    extra_cost_ns: int | None
    note: str = ""  # why nothing fits, or the solver's status


def sweep(
    graph: Graph,
    budgets: Sequence[str | int],
    *,
    time_limit_s: float = 30.0,
    reserve: float | None = None,
    objective: str = "time",
    rematerialize: bool = True,
) -> list[SweepRow]:
    """One row per budget and policy, budgets in the order given, ckptplan first."""
    if not budgets:
        raise InputError("give at least one budget, e.g. --budgets 60%,50%,40%")
    reserve = default_reserve(graph) if reserve is None else reserve
    regions = candidate_regions(graph)
    results = baselines.all_baselines(graph, regions)
    keep = round((1 - reserve) * RESERVE_SCALE)
    rows: list[SweepRow] = []
    for budget in budgets:
        text = str(budget)
        nbytes = parse_budget(budget, reference_bytes=graph.baseline_peak_bytes)
        try:
            plan = solve(
                graph,
                budget,
                time_limit_s=time_limit_s,
                reserve=reserve,
                objective=objective,
                rematerialize=rematerialize,
            )
            note = f"{plan.status.value}, gap {100 * plan.gap:.2f}%"
            rows.append(
                SweepRow(
                    budget=text,
                    budget_bytes=nbytes,
                    policy=CKPTPLAN,
                    knob=objective,
                    fits=True,
                    peak_bytes=plan.predicted_peak_bytes,
                    extra_forward_flops=plan.extra_forward_flops,
                    extra_cost_ns=plan.extra_cost_ns,
                    note=note,
                )
            )
        except InfeasibleBudget as e:
            rows.append(
                SweepRow(
                    budget=text,
                    budget_bytes=nbytes,
                    policy=CKPTPLAN,
                    knob=objective,
                    fits=False,
                    peak_bytes=None,
                    extra_forward_flops=None,
                    extra_cost_ns=None,
                    note=f"below the minimum {format_bytes(e.minimum_bytes)}",
                )
            )
        usable = nbytes * keep // RESERVE_SCALE
        for policy, best in baselines.best_fitting(results, usable).items():
            if best is None:
                lowest = min((r.peak_bytes for r in results if r.policy is policy), default=None)
                why = f"lowest peak {format_bytes(lowest)}" if lowest is not None else "no blocks to checkpoint"
                rows.append(
                    SweepRow(
                        budget=text,
                        budget_bytes=nbytes,
                        policy=policy.value,
                        knob="",
                        fits=False,
                        peak_bytes=None,
                        extra_forward_flops=None,
                        extra_cost_ns=None,
                        note=why,
                    )
                )
            else:
                rows.append(
                    SweepRow(
                        budget=text,
                        budget_bytes=nbytes,
                        policy=policy.value,
                        knob=best.knob,
                        fits=True,
                        peak_bytes=best.peak_bytes,
                        extra_forward_flops=best.extra_forward_flops,
                        extra_cost_ns=best.extra_cost_ns,
                    )
                )
    return rows


def memory_unit(nbytes: int) -> tuple[str, int]:
    """The binary unit a memory axis reads best in for values up to ``nbytes``: ("MiB", 2**20), ..."""
    for name, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size:
            return name, size
    return "B", 1


def pareto_plot(
    rows: Sequence[SweepRow], path: str | Path, *, title: str, forward_flops: int, forward_cost_ns: int = 0
) -> Path:
    """Two panels against peak memory, one line per policy: estimated step-time overhead (% of a step, or
    ms when the step's time is unknown) and extra forward FLOPs (% of forward); the budgets as vertical
    lines, memory in the model's own unit. ckptplan appears only on the panel of the objective it minimised
    (its SweepRow knob): on the other it is not optimal, and a policy below it there says nothing. Needs
    matplotlib."""
    path = Path(path)
    fig = pareto_figure(rows, title=title, forward_flops=forward_flops, forward_cost_ns=forward_cost_ns)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--plot needs matplotlib: pip install 'ckptplan[plot]' (or pip install matplotlib)") from None
    return plt


def pareto_figure(rows: Sequence[SweepRow], *, title: str, forward_flops: int, forward_cost_ns: int = 0) -> Any:
    """``pareto_plot``'s matplotlib figure (two axes), not saved."""
    plt = _pyplot()
    fitting = [
        r
        for r in rows
        if r.fits and r.peak_bytes is not None and r.extra_forward_flops is not None and r.extra_cost_ns is not None
    ]
    unit, size = memory_unit(max([r.peak_bytes or 0 for r in fitting] + [r.budget_bytes for r in rows] + [1]))
    step_ns = 3 * forward_cost_ns  # forward and a backward of about twice its cost, as report.STEP_PER_FORWARD
    objective = next((r.knob for r in rows if r.policy == CKPTPLAN), "time")
    panels = [
        (
            "time",
            "est. step-time overhead (% of step)" if step_ns else "est. recompute time (ms)",
            lambda r: 100 * r.extra_cost_ns / step_ns if step_ns else r.extra_cost_ns / 1e6,
        ),
        ("flops", "extra forward FLOPs (% of forward)", lambda r: 100 * r.extra_forward_flops / max(forward_flops, 1)),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (goal, ylabel, value) in zip(axes, panels):
        for policy in dict.fromkeys(r.policy for r in rows):
            if policy == CKPTPLAN and goal != objective:
                continue
            pts = sorted({((r.peak_bytes or 0) / size, value(r)) for r in fitting if r.policy == policy})
            if pts:
                ax.plot(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    "o-" if policy == CKPTPLAN else "s--",
                    label=f"ckptplan (minimises {goal})" if policy == CKPTPLAN else policy,
                    linewidth=2.2 if policy == CKPTPLAN else 1.2,
                )
        for b in dict.fromkeys(r.budget_bytes for r in rows):
            ax.axvline(b / size, color="grey", linestyle=":", linewidth=1)
        note = "" if goal == objective else f" (ckptplan minimised {objective}: not shown)"
        ax.set(xlabel=f"peak memory ({unit}); dotted: budgets", ylabel=ylabel, title=f"{ylabel.split(' (')[0]}{note}")
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
