"""`trace`, `explain`, `show` and `diff`: what a step or a plan holds, for humans and as JSON."""

from __future__ import annotations

# NOTE [ Lazy package ] (cli/__init__.py): torch and OR-Tools are imported inside the commands, never here.
import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from .. import report
from ..errors import CkptplanError
from ..plan import load_plan
from ..units import format_bytes
from .common import (
    ArgOpt,
    AutocastOpt,
    GpuOpt,
    JsonOpt,
    ModelOpt,
    OptimizerOpt,
    ParallelOpt,
    QuietOpt,
    SdpaOpt,
    TargetOpt,
    WorldOpt,
    check_depth,
    console,
    err,
    fail,
    interrupted,
    plan_where,
    trace_step,
    where_of,
)


def trace_cmd(
    model: ModelOpt = None,
    arg: ArgOpt = None,
    optimizer: OptimizerOpt = None,
    parallel: ParallelOpt = None,
    world_size: WorldOpt = 1,
    target: TargetOpt = None,
    gpu: GpuOpt = None,
    sdpa: SdpaOpt = None,
    autocast: AutocastOpt = None,
    breakdown: Annotated[
        bool,
        typer.Option(
            "--breakdown",
            help="Also print what is alive at the peak: by kind, activations by module, "
            "the largest tensors (as `ckptplan explain` does for a plan).",
        ),
    ] = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Trace one training step and print its memory facts: peaks, FLOPs, candidate regions and
    rematerializations."""
    from ..planner import full_checkpointing
    from ..solver.regions import candidate_regions
    from ..solver.remat import remat_candidates
    from ..solver.simulate import simulate

    try:
        _, graph = trace_step(
            model, arg, optimizer, quiet or as_json, parallel, world_size, where=where_of(target, gpu, sdpa, autocast)
        )
    except CkptplanError as e:
        fail(e, as_json)
        return
    except KeyboardInterrupt:
        interrupted("nothing traced")
    regions = candidate_regions(graph)
    full = simulate(graph, regions, full_checkpointing(graph, regions))
    info = report.graph_summary(
        graph, regions=len(regions), full_peak=full.peak_bytes, remats=len(remat_candidates(graph, regions))
    )
    peak = None
    if breakdown:
        from ..explain import as_dict, explain as explain_peak

        peak = explain_peak(graph)[0]
        info["breakdown"] = as_dict(peak)
    if as_json:
        print(json.dumps(info, indent=2))
    elif not quiet:
        info.pop("breakdown", None)
        err.print(
            escape(
                f"peak {format_bytes(graph.baseline_peak_bytes)} without checkpointing, "
                f"{format_bytes(full.peak_bytes)} with each block checkpointed (+"
                f"{100 * full.extra_forward_flops / max(graph.forward_flops, 1):.1f}% FLOPs); "
                f"{len(regions)} candidate regions"
            ),
            highlight=False,
        )
        err.print(report.graph_table(info))
        for part in report.explain_tables(graph, peak) if peak is not None else ():
            err.print(part, highlight=False)


def explain(
    plan_file: Annotated[Path, typer.Argument(help="A plan written by `ckptplan solve`.")],
    model: ModelOpt = None,
    arg: ArgOpt = None,
    depth: Annotated[
        Optional[int],
        typer.Option(
            help="Charge activations to modules this many path components deep (3: transformer.h.3).",
            show_default=False,
        ),
    ] = None,
    top: Annotated[int, typer.Option(help="How many of the largest tensors alive at the peak to list.")] = 10,
    as_json: JsonOpt = False,
) -> None:
    """What makes the peak, with and without the plan: parameters, gradients, optimizer state, activations
    by module (identical layers folded), and the largest tensors alive there. Traces the model the plan is
    for (--model, -a as for solve); the parts sum to the plan's predicted peak."""
    from ..decisions import check_plan
    from ..explain import as_dict, explain as explain_peak

    try:
        check_depth(depth)
        plan = load_plan(plan_file)
        mode, _, world = plan.parallel.partition(":")
        _, graph = trace_step(
            model, arg, plan.optimizer, as_json, mode or None, int(world or 1), where=plan_where(plan)
        )
        check_plan(graph, plan)
        without, planned = explain_peak(graph, plan, depth=depth, top=top)
    except CkptplanError as e:
        fail(e, as_json)
        return
    except KeyboardInterrupt:
        interrupted("nothing explained")
    assert planned is not None  # explain() was given the plan
    if as_json:
        print(
            json.dumps(
                {
                    "model": graph.model_name,
                    "budget_bytes": plan.budget_bytes,
                    "no_checkpointing": as_dict(without),
                    "plan": as_dict(planned),
                },
                indent=2,
            )
        )
        return
    out = console()
    for part in report.explain_tables(graph, without, planned, plan=plan, depth=depth):
        out.print(part, highlight=False)


def show(
    plan_file: Annotated[Path, typer.Argument(help="A plan written by `ckptplan solve`.")],
    ops: Annotated[bool, typer.Option("--ops", help="Also list every op of each region and its decision.")] = False,
    sort: Annotated[str, typer.Option(help="Op row order inside a region (--ops): order, bytes or flops.")] = "order",
    fold: Annotated[bool, typer.Option(help="Fold identical layers into one group.")] = True,
    model: Annotated[
        Optional[str],
        typer.Option(
            "--model",
            "-m",
            help="Also trace this model and re-simulate the plan's decisions on it "
            "(catches hand edits that no longer fit).",
        ),
    ] = None,
    arg: ArgOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print a plan: the answer in one line, its header, its regions with identical layers folded and, with
    --ops, every op's decision."""
    if sort not in ("order", "bytes", "flops"):
        raise typer.BadParameter("choose order, bytes or flops", param_hint="--sort")
    resimulated, forward_ns = None, 0
    try:
        plan = load_plan(plan_file)
        if model is not None:
            from ..decisions import check_plan

            mode, _, world = plan.parallel.partition(":")
            loaded, graph = trace_step(
                model, arg, plan.optimizer, True, mode or None, int(world or 1), where=plan_where(plan)
            )
            resimulated, forward_ns = (loaded.name, check_plan(graph, plan)), graph.forward_cost_ns
    except CkptplanError as e:
        fail(e, as_json)
        return
    except KeyboardInterrupt:
        interrupted("nothing shown")
    if as_json:
        extra = {} if resimulated is None else {"resimulated_peak_bytes": resimulated[1].peak_bytes}
        print(json.dumps({**report.plan_summary(plan), **extra}, indent=2))
        return
    out = console()
    out.print(escape(report.answer(plan, forward_cost_ns=forward_ns)), highlight=False)
    if resimulated is not None:
        name, sim = resimulated
        out.print(
            escape(
                f"re-simulated on {name} as traced now: peak {format_bytes(sim.peak_bytes)} (the plan "
                f"says {format_bytes(plan.predicted_peak_bytes)}), within its budget"
            ),
            highlight=False,
        )
    out.print(report.summary_table(plan, str(plan_file), forward_cost_ns=forward_ns))
    out.print(report.regions_table(plan, fold=fold))
    for table in report.decisions_tables(plan, sort=sort, fold=fold) if ops else ():
        out.print(table)


def diff(
    a: Annotated[Path, typer.Argument(help="First plan.")],
    b: Annotated[Path, typer.Argument(help="Second plan.")],
    ops: Annotated[bool, typer.Option("--ops", help="List every op whose decision changed.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Show what changed between two plans: peaks, FLOPs, checkpointed regions (folded), op decisions."""
    try:
        d = report.diff_plans(load_plan(a), load_plan(b))
    except CkptplanError as e:
        fail(e, as_json)
        return
    if as_json:
        print(json.dumps(d, indent=2))
    else:
        console().print(report.diff_table(d, ops=ops))
