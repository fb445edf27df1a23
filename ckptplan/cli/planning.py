"""`solve`, `sweep` and `fit`: the commands that trace a step and solve for a budget."""

from __future__ import annotations

# NOTE [ Lazy package ] (cli/__init__.py): torch and OR-Tools are imported inside the commands, never here.
import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape

from .. import report
from ..errors import CkptplanError, InfeasibleBudget, InputError
from ..modelspec import bundled_example, parse_factory_args
from ..planner import DEFAULT_GAP
from ..units import format_bytes, parse_budget, suggest_budget
from .common import (
    PLOT_FORMATS,
    SYNTAX_REFERENCE,
    ArgOpt,
    AutocastOpt,
    GpuOpt,
    JsonOpt,
    ModelOpt,
    ObjectiveOpt,
    OptimizerOpt,
    ParallelOpt,
    ProfileOpt,
    QuietOpt,
    RematOpt,
    SdpaOpt,
    SeqLenOpt,
    TargetOpt,
    WorldOpt,
    card_budget,
    check_output,
    check_time_limit,
    err,
    fail,
    interrupted,
    model_code,
    null_status,
    parse_seq_lens,
    progress_line,
    require_extra,
    trace_step,
    where_of,
    write_file,
)


def solve(
    budget: Annotated[
        str,
        typer.Option(
            "--budget",
            "-b",
            help="Peak memory of one training step: 8GB (10^9 B), 8GiB (2^30 B), bytes, "
            "or 70% of the no-checkpointing peak.",
        ),
    ],
    model: ModelOpt = None,
    arg: ArgOpt = None,
    optimizer: OptimizerOpt = None,
    parallel: ParallelOpt = None,
    world_size: WorldOpt = 1,
    seq_len: SeqLenOpt = None,
    objective: ObjectiveOpt = "time",
    output: Annotated[
        Optional[Path],
        typer.Option("--output", "-o", help="Where to write the plan (default: plans/FACTORY-BUDGET.yaml)."),
    ] = None,
    time_limit: Annotated[float, typer.Option(help="Solver time limit in seconds.")] = 30.0,
    reserve: Annotated[
        Optional[float],
        typer.Option(
            help="Fraction of the budget kept free for allocator slack and what tracing cannot see "
            "(default: 0 for one process traced on CPU; 0.02 on a GPU, meta or fake tensors, DDP or FSDP).",
            show_default=False,
        ),
    ] = None,
    gap: Annotated[
        float,
        typer.Option(help="Stop once the plan is proven within this fraction of the cheapest (0: prove it optimal)."),
    ] = DEFAULT_GAP,
    remat: RematOpt = True,
    target: TargetOpt = None,
    gpu: GpuOpt = None,
    sdpa: SdpaOpt = None,
    autocast: AutocastOpt = None,
    profile: ProfileOpt = None,
    server: Annotated[
        Optional[str],
        typer.Option(
            help="Solve on this `ckptplan serve` server (http://HOST:PORT), which answers identical requests from "
            "its cache; the plan file is the one a local solve writes. Token: CKPTPLAN_TOKEN."
        ),
    ] = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Trace one training step and write the cheapest checkpointing plan that fits the budget."""
    from ..planner import check_options, solve as solve_plan

    quiet = quiet or as_json
    try:
        where = where_of(target, gpu, sdpa, autocast)
        budget_given, budget = budget, card_budget(budget, where)
        parse_budget(budget, reference_bytes=SYNTAX_REFERENCE)  # a typo fails before the trace, not after
        check_options(reserve=reserve, gap=gap)  # before the trace, like the budget
        check_time_limit(time_limit)
        if output is not None:
            check_output(output, "-o")
        loaded, graph = trace_step(model, arg, optimizer, quiet, parallel, world_size, parse_seq_lens(seq_len), where)
        with err.status("solving...", spinner="dots") if not quiet else null_status() as status:
            plan = solve_plan(
                graph,
                budget,
                time_limit_s=time_limit,
                reserve=reserve,
                objective=objective,
                gap=gap,
                rematerialize=remat,
                profile=profile,
                server=server,
                progress=progress_line(status) if status is not None else None,
            )
        path = output or Path("plans") / f"{loaded.name}-{re.sub(r'[^A-Za-z0-9.]+', '', budget_given)}.yaml"
        write_file(path, "-o", lambda: plan.save(path))
    except InfeasibleBudget as e:
        if not as_json:
            err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)
            again = [f"--budget {suggest_budget(e.minimum_bytes)}"] + ([f"--model {model}"] if model else [])
            again += [f"-a {a}" for a in arg or []] + ([f"--optimizer {optimizer}"] if optimizer else [])
            again += [f"--reserve {reserve}"] if reserve is not None else []
            again += [f"--parallel {parallel} --world-size {world_size}"] if parallel else []
            again += [f"--seq-len {seq_len}"] if seq_len else []
            again += [f"--objective {objective}"] if objective != "time" else []
            again += [f"--gap {gap}"] if gap != DEFAULT_GAP else []
            again += ["--no-remat"] if not remat else []
            again += [f"--{k} {v}" for k, v in where.items()] + ([f"--profile {profile}"] if profile else [])
            what = "minimum feasible budget" if e.minimum_proven else "lowest budget known to fit (not proven minimal)"
            err.print(
                escape(f"{what}: {format_bytes(e.minimum_bytes)}; try: ckptplan solve {' '.join(again)}"),
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(e.exit_code) from None
        fail(e, as_json)
        return
    except CkptplanError as e:
        fail(e, as_json)
        return
    except KeyboardInterrupt:
        # Ctrl-C inside CP-SAT stops the search and keeps the best plan; elsewhere nothing is written.
        err.print("interrupted: no plan written")
        raise typer.Exit(130) from None
    if as_json:
        print(
            json.dumps(
                {**report.plan_summary(plan), "fits_without_checkpointing": not plan.regions, "plan_file": str(path)},
                indent=2,
            )
        )
    elif not quiet:
        primary = graph if not isinstance(graph, list) else graph[0]
        err.print(
            fits_without(plan, path)
            if not plan.regions
            else escape(report.answer(plan, forward_cost_ns=primary.forward_cost_ns)),
            highlight=False,
        )
        err.print(report.summary_table(plan, str(path), forward_cost_ns=primary.forward_cost_ns))
        if plan.device == "cuda":
            err.print(report.cuda_memory_note(primary, plan), highlight=False)


def fits_without(plan: Any, path: Path) -> str:
    """The answer for a budget at or above the unplanned peak: no checkpointing is needed."""
    kept = f" less the {plan.reserve:.0%} reserve" if plan.reserve else ""
    return escape(
        f"fits without checkpointing: the peak without checkpointing, "
        f"{format_bytes(plan.baseline_peak_bytes)}, is within the budget {format_bytes(plan.budget_bytes)}"
        f"{kept}; the plan {path} checkpoints nothing, so applying it leaves the model as it is"
    )


def sweep(
    budgets: Annotated[
        str,
        typer.Option(
            "--budgets", help="Comma-separated budgets, e.g. 60%,50%,40% or 6GB,5GB (same syntax as --budget)."
        ),
    ],
    model: ModelOpt = None,
    arg: ArgOpt = None,
    optimizer: OptimizerOpt = None,
    objective: ObjectiveOpt = "time",
    time_limit: Annotated[float, typer.Option(help="Solver time limit in seconds, per budget.")] = 30.0,
    reserve: Annotated[
        Optional[float],
        typer.Option(
            help="Fraction of each budget kept free, applied to every policy alike (default: as solve's).",
            show_default=False,
        ),
    ] = None,
    plot: Annotated[
        Optional[Path],
        typer.Option(
            help="Also write a plot to this file (.png, .pdf, .svg, ...): estimated step-time overhead and extra "
            "FLOPs against peak memory, budgets as lines (needs matplotlib: pip install 'ckptplan\\[plot]')."
        ),
    ] = None,
    remat: RematOpt = True,
    target: TargetOpt = None,
    gpu: GpuOpt = None,
    sdpa: SdpaOpt = None,
    autocast: AutocastOpt = None,
    profile: ProfileOpt = None,
    server: Annotated[
        Optional[str],
        typer.Option(
            help="Sweep on this `ckptplan serve` server, which caches the rows (and draws the plot on its page)."
        ),
    ] = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Compare ckptplan with full, every-k-th-block and torchtitan-style op checkpointing at several
    budgets, all predicted by the simulator (`ckptplan verify` and benchmarks/run.py measure)."""
    from ..compare import pareto_plot, sweep as sweep_policies

    quiet = quiet or as_json
    items = [b.strip() for b in budgets.split(",") if b.strip()]
    try:
        if not items:
            raise InputError("--budgets needs at least one budget, e.g. --budgets 60%,50%,40%")
        for b in items:
            parse_budget(b, reference_bytes=SYNTAX_REFERENCE)  # a typo fails before the trace
        check_time_limit(time_limit)
        if plot is not None:
            require_extra("plot", "--plot")
            if plot.suffix.lower().lstrip(".") not in PLOT_FORMATS:
                raise InputError(
                    f"--plot {plot}: give a file ending in one of .{', .'.join(PLOT_FORMATS)}, e.g. pareto.png"
                )
            check_output(plot, "--plot")
        _, graph = trace_step(model, arg, optimizer, quiet, where=where_of(target, gpu, sdpa, autocast))
        if profile is not None:
            from ..planner import _priced

            graph = _priced(graph, profile)[0]
        with err.status("solving each budget...", spinner="dots") if not quiet else null_status():
            if server is None:
                rows = sweep_policies(
                    graph, items, time_limit_s=time_limit, reserve=reserve, objective=objective, rematerialize=remat
                )
            else:
                from ..serve.client import sweep_remote

                rows = sweep_remote(
                    graph,
                    items,
                    server=server,
                    time_limit_s=time_limit,
                    reserve=reserve,
                    objective=objective,
                    rematerialize=remat,
                )
        if plot is not None:
            write_file(
                plot,
                "--plot",
                lambda: pareto_plot(
                    rows,
                    plot,
                    title=f"{graph.model_name}: predicted",
                    forward_flops=graph.forward_flops,
                    forward_cost_ns=graph.forward_cost_ns,
                ),
            )
    except CkptplanError as e:
        fail(e, as_json)
        return
    except KeyboardInterrupt:
        interrupted()
    if as_json:
        print(
            json.dumps(
                {
                    "model": graph.model_name,
                    "forward_flops": graph.forward_flops,
                    "no_checkpointing_peak_bytes": graph.baseline_peak_bytes,
                    "rows": [asdict(r) for r in rows],
                    "plot": str(plot) if plot else None,
                },
                indent=2,
            )
        )
    elif not quiet:
        for line in report.sweep_answer(rows, forward_flops=graph.forward_flops):
            err.print(escape(line), highlight=False)
        err.print(report.sweep_table(rows, forward_flops=graph.forward_flops))
        if plot is not None:
            err.print(f"plot written to {plot}")


def fit_cmd(
    budget: Annotated[
        str,
        typer.Option(
            "--budget",
            "-b",
            help="Peak memory of one training step: 80GB (10^9 B), 80GiB (2^30 B) or bytes "
            "(not a percentage: the unplanned peak changes with the value).",
        ),
    ],
    vary: Annotated[str, typer.Option(help="The factory argument to search over, e.g. batch_size or seq_len.")],
    model: ModelOpt = None,
    arg: ArgOpt = None,
    optimizer: OptimizerOpt = None,
    start: Annotated[int, typer.Option(help="The smallest value tried (the search doubles it from here).")] = 1,
    max_value: Annotated[
        Optional[int], typer.Option("--max", help="The largest value tried (default: 2^20).", show_default=False)
    ] = None,
    multiple_of: Annotated[int, typer.Option(help="Try multiples of this only (e.g. 64 for seq_len).")] = 1,
    objective: ObjectiveOpt = "time",
    output: Annotated[
        Optional[Path],
        typer.Option(
            "--output",
            "-o",
            help="Where to write the plan of the largest value that fits "
            "(default: plans/FACTORY-ARGVALUE-BUDGET.yaml).",
        ),
    ] = None,
    time_limit: Annotated[float, typer.Option(help="Solver time limit in seconds, per value and search.")] = 30.0,
    reserve: Annotated[
        Optional[float],
        typer.Option(help="Fraction of the budget kept free (default: as solve's).", show_default=False),
    ] = None,
    gap: Annotated[
        float, typer.Option(help="Stop once each plan is proven within this fraction of the cheapest.")
    ] = DEFAULT_GAP,
    remat: RematOpt = True,
    target: TargetOpt = None,
    gpu: GpuOpt = None,
    sdpa: SdpaOpt = None,
    autocast: AutocastOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Find the largest value of a factory argument (--vary batch_size, seq_len, ...) whose training step fits
    the budget, with the least estimated cost, and write its plan. Each value is traced as the factory builds
    it: build the model on the meta device (as the bundled example does) and no value needs real memory.

    Exits 2 when the factory has no such argument, 3 when nothing fits even at --start, 4 when the time limit
    found no plan there.
    """
    from ..fit import DEFAULT_LIMIT, fit as fit_search
    from ..modelspec import call_factory, check_factory_argument, load_factory
    from ..planner import check_options

    quiet = quiet or as_json
    try:
        if not vary.isidentifier():
            raise InputError(f"--vary {vary!r} must name a factory argument, e.g. --vary batch_size")
        where = where_of(target, gpu, sdpa, autocast)
        budget_given, budget = budget, card_budget(budget, where)
        parse_budget(budget, reference_bytes=SYNTAX_REFERENCE)  # a typo fails before any trace
        check_options(reserve=reserve, gap=gap)
        check_time_limit(time_limit)
        if output is not None:
            check_output(output, "-o")
        factory_kwargs = parse_factory_args(arg or [])
        if vary in factory_kwargs:
            raise InputError(
                f"--vary {vary} sets {vary}; drop -a {vary}={factory_kwargs[vary]} (use --start and "
                "--max to bound the search)"
            )
        from .. import _compat  # noqa: F401  first: names any torch internal this torch lacks
        from ..trace import trace

        name, factory = load_factory(model or bundled_example())
        check_factory_argument(name, factory, vary)

        def build(value: int):
            if status is not None:
                status.update(f"{vary}={value}: tracing one training step and solving...")
            loaded = call_factory(name, factory, {**factory_kwargs, vary: value})
            with model_code(name):
                return trace(loaded.model, *loaded.args, optimizer=optimizer, model_name=name, **where, **loaded.kwargs)

        def tried(trial: Any) -> None:
            if not quiet:
                cost = (
                    "does not fit"
                    if not trial.fits
                    else "fits without checkpointing"
                    if not trial.plan.regions
                    else f"fits, +{100 * trial.step_time_fraction:.1f}% estimated step time"
                )
                err.print(f"{vary}={trial.value}: {cost}", highlight=False)

        with err.status("searching...", spinner="dots") if not quiet else null_status() as status:
            result = fit_search(
                build,
                budget,
                argument=vary,
                start=start,
                limit=DEFAULT_LIMIT if max_value is None else max_value,
                multiple_of=multiple_of,
                time_limit_s=time_limit,
                reserve=reserve,
                objective=objective,
                gap=gap,
                rematerialize=remat,
                progress=tried,
            )
        best = result.best
        plan, fraction = best.plan, best.step_time_fraction
        assert plan is not None and fraction is not None  # FitResult's best trial fits
        tag = re.sub(r"[^A-Za-z0-9.]+", "", budget_given)
        path = output or Path("plans") / f"{name}-{vary}{best.value}-{tag}.yaml"
        write_file(path, "-o", lambda: plan.save(path))
    except CkptplanError as e:
        fail(e, as_json)
        return
    except KeyboardInterrupt:
        interrupted("no plan written")
    if as_json:
        print(json.dumps({**report.fit_summary(result), "plan_file": str(path)}, indent=2))
    elif not quiet:
        more = f"; the largest value tried (--max {result.limit}): larger ones may fit" if result.at_limit else ""
        err.print(
            escape(
                f"largest {vary} that fits {format_bytes(result.budget_bytes)}: {best.value} (peak "
                f"{format_bytes(plan.predicted_peak_bytes)}, +{100 * fraction:.1f}% "
                f"estimated step time, +{100 * plan.extra_forward_fraction:.1f}% forward FLOPs; "
                f"checkpoints {report.regions_text(plan) if plan.regions else 'nothing'}){more}; plan "
                f"written to {path}"
            ),
            highlight=False,
        )
        err.print(report.fit_table(result))
