"""``ckptplan``: a thin typer CLI over the library. Human output goes to stderr, ``--json`` to stdout.

Exit codes: 0 ok, 2 usage or bad input (a budget, option, model spec, plan file, a model whose step fails
to run or calls sys.exit, a factory argument `fit --vary` names that the factory lacks, or an option whose
optional dependency is not installed), 3 infeasible budget (for `fit`: nothing fits even at --start), 4 time
limit with no feasible plan, 5 plan does not match the model, 6 `verify` measured a peak above the budget, 7 an
output file (`-o`, `--plot`) cannot be written (a directory, under a file, not writable, disk full), 8 the
server (--server) could not be reached or failed, 130 interrupted (Ctrl-C; nothing written).
"""

from __future__ import annotations

# NOTE [ Lazy package ]: building this app imports neither torch nor OR-Tools (tests/test_cli_fast.py), so
# `--help` answers at once; each command imports what it needs in its body.
import errno
import importlib.util
import json
import math
import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape

from . import report
from .errors import CkptplanError, InfeasibleBudget, InputError, OutputError
from .modelspec import BUNDLED_EXAMPLE, bundled_example, load_model, parse_factory_args
from .plan import load_plan
from .planner import DEFAULT_GAP
from .units import format_bytes, format_flops, parse_budget, suggest_budget

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                  help="Plan activation checkpointing for PyTorch training under a memory budget.")
err = Console(stderr=True)
SYNTAX_REFERENCE = 2**50  # stands in for the no-checkpointing peak when only the syntax is checked
# the package's extras (pyproject.toml) -> the modules they install, checked before an option needing them works
EXTRAS = {"plot": ("matplotlib",), "serve": ("fastapi", "uvicorn")}
PLOT_FORMATS = ("png", "pdf", "svg", "jpg", "jpeg", "webp", "eps", "ps", "tif", "tiff")  # matplotlib's savefig

ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", help=f"path/to/file.py:factory or package.module:factory (default: {BUNDLED_EXAMPLE}).")]
ArgOpt = Annotated[Optional[list[str]], typer.Option(
    "--arg", "-a", help="Keyword argument for the factory, name=value (repeatable), e.g. -a batch_size=4.")]
OptimizerOpt = Annotated[Optional[str], typer.Option(
    help="Add this optimizer's state to the fixed memory: adamw, adam, sgd, momentum, adagrad, rmsprop.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]
ParallelOpt = Annotated[Optional[str], typer.Option(
    help="Data parallelism the step runs under: ddp or fsdp (FSDP2 fully_shard per block). The model spec "
         "gives one rank's batch; the budget is per rank.")]
WorldOpt = Annotated[int, typer.Option(help="Number of data-parallel ranks (with --parallel).")]
ObjectiveOpt = Annotated[str, typer.Option(
    help="What to minimise: time (estimated recompute time, the default) or flops (recomputed FLOPs, then "
         "time).")]
SeqLenOpt = Annotated[Optional[str], typer.Option(
    help="Comma-separated sequence lengths, passed to the factory as seq_len=...: one plan that holds for "
         "each (its peak fits at the largest).")]
RematOpt = Annotated[bool, typer.Option(
    "--remat/--no-remat", help="Let the plan also rematerialize: drop tensors backward would hold (a BatchNorm + "
                               "ReLU output the next convolution saves) and rebuild them from what backward keeps "
                               "anyway. --no-remat plans checkpoints only (needed under torch.compile).")]


TargetOpt = Annotated[Optional[str], typer.Option(
    help="Device type the plan is for: cuda or cpu (default: cuda for a model built on the meta device or "
         "with fake tensors, which then takes CUDA's kernels: fused attention and dropout; cpu for a real CPU "
         "model).", show_default=False)]
GpuOpt = Annotated[Optional[str], typer.Option(
    help="GPU a cuda plan is for: h100, h200, a100, a100-40gb, l4, ... or a compute capability (9.0); it "
         "decides the attention kernel and what --budget card means (default: h100).", show_default=False)]
SdpaOpt = Annotated[Optional[str], typer.Option(
    help="Attention kernel a meta trace takes: auto (torch's choice for the GPU), cudnn, flash, efficient or "
         "math (as your run's torch.nn.attention.sdpa_kernel forces).", show_default=False)]
AutocastOpt = Annotated[Optional[str], typer.Option(
    help="The step runs forward and loss under torch.autocast with this dtype: bf16 or fp16 (a meta trace then "
         "makes the casts CUDA's autocast makes; a real model runs torch's autocast).", show_default=False)]
ProfileOpt = Annotated[Optional[Path], typer.Option(
    help="Device cost profile (YAML/JSON, as benchmarks/gpu_calibrate.py writes it) the recompute time is "
         "estimated with (default: the built-in profile of the target).", show_default=False)]


def _where(target: str | None, gpu: str | None, sdpa: str | None, autocast: str | None = None) -> dict[str, Any]:
    """trace()'s target keywords, those given only."""
    return {k: v for k, v in (("target", target), ("gpu", gpu), ("sdpa", sdpa), ("autocast", autocast))
            if v is not None}


def _plan_where(plan: Any) -> dict[str, Any]:
    """trace()'s target keywords for the step a plan was made for (none for a plan older than targets)."""
    return _where(plan.device if plan.device in ("cpu", "cuda") else None, plan.gpu or None, None,
                  plan.autocast or None)


def _card_budget(budget: str, where: dict[str, Any]) -> str:
    """``--budget card``: the GPU's memory less the CUDA context and the allocator's fragmentation."""
    if budget.strip().lower() != "card":
        return budget
    from .target import parse_gpu

    if where.get("target", "cuda") != "cuda":
        raise InputError("--budget card is a GPU's memory: it needs a cuda target (and --gpu)")
    return str(parse_gpu(where.get("gpu")).card_budget())


def _fail(e: CkptplanError, as_json: bool) -> None:
    if as_json:
        payload: dict[str, Any] = {"error": type(e).__name__, "message": str(e), "exit_code": e.exit_code}
        if isinstance(e, InfeasibleBudget):
            payload["minimum_bytes"] = e.minimum_bytes
            payload["minimum_proven"] = e.minimum_proven
            payload["minimum_source"] = e.minimum_source
        print(json.dumps(payload, indent=2))
    err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)
    raise typer.Exit(e.exit_code)


def _require_extra(extra: str, what: str) -> None:
    """Refuse, before any work, ``what`` when the modules of the package's extra ``extra`` are missing."""
    missing = [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]
    if missing:
        raise InputError(f"{what} needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
                         f"installed: pip install 'ckptplan[{extra}]' (or pip install {' '.join(missing)})")


def _interrupted(what: str = "nothing written") -> NoReturn:
    err.print(f"interrupted: {what}")
    raise typer.Exit(130)


def _trace(model: str | None, args: list[str] | None, optimizer: str | None, quiet: bool,
           parallel: str | None = None, world_size: int = 1, seq_lens: list[int] | None = None,
           where: dict[str, Any] | None = None):
    from . import _compat  # noqa: F401  first: names any torch internal this torch lacks
    from .parallel import Parallel, for_ranks
    from .trace import trace

    if parallel is not None and parallel not in {p.value for p in Parallel}:
        raise typer.BadParameter("choose ddp or fsdp", param_hint="--parallel")
    if world_size < 1 or (world_size > 1 and parallel is None):
        raise typer.BadParameter("a world size above 1 needs --parallel ddp or fsdp", param_hint="--world-size")
    factory_kwargs = parse_factory_args(args or [])
    graphs = []
    lens: list[int | None] = list(seq_lens) if seq_lens else [None]
    for n in lens:
        loaded = load_model(model or bundled_example(),
                            factory_kwargs if n is None else {**factory_kwargs, "seq_len": n})
        with err.status(f"tracing one training step{f' (seq_len {n})' if n else ''}...",
                        spinner="dots") if not quiet else _null(), _model_code(loaded.name):
            graph = trace(loaded.model, *loaded.args, optimizer=optimizer, model_name=loaded.name,
                          **(where or {}), **loaded.kwargs)
        graphs.append(for_ranks(graph, world_size=world_size, mode=parallel) if parallel else graph)
    return loaded, graphs[0] if seq_lens is None else graphs


class _model_code:
    """Runs the user's model: what its step raises (a shape error, sys.exit) becomes an InputError (exit 2)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, e: Any, _tb: Any) -> None:
        if kind is None or issubclass(kind, (CkptplanError, KeyboardInterrupt)) or not issubclass(
                kind, (Exception, SystemExit)):
            return
        what = f"SystemExit({e.code!r}) (it calls sys.exit())" if isinstance(e, SystemExit) else f"{kind.__name__}: {e}"
        raise InputError(f"running one training step of {self.name} raised {what}. Check that the factory's "
                         "inputs fit the model (run model(*args) once without ckptplan); if they do, this is a "
                         "ckptplan bug: please report it with the model") from None


def _check_time_limit(seconds: float) -> None:
    if not (math.isfinite(seconds) and seconds > 0):
        raise typer.BadParameter(f"give a positive number of seconds, e.g. 30 (not {seconds})",
                                 param_hint="--time-limit")


def _check_output(path: Path, option: str) -> None:
    """Refuse, before any work, an output path that cannot be a file we write."""
    if str(path) in ("", ".") or path.is_dir():
        raise OutputError(f"{option} {str(path)!r} is a directory; give a file name, e.g. {path / 'plan.yaml'}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{option} {path}: {parent} is a file, not a folder; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {path}: the folder {parent} is not writable; choose another path")


def _write(path: Path, option: str, write: Any) -> None:
    """``write()`` creates ``path``; an OSError (read-only file system, disk full, ...) becomes OutputError."""
    try:
        write()
    except OSError as e:
        why = "the disk is full" if e.errno == errno.ENOSPC else e.strerror or str(e)
        raise OutputError(f"cannot write {option} {path}: {why}; nothing was written there") from None


def _seq_lens(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise typer.BadParameter("give whole numbers separated by commas, e.g. 2048,4096,8192",
                                 param_hint="--seq-len") from None
    if not values or values[0] < 1:
        raise typer.BadParameter("give positive lengths, e.g. 2048,4096,8192", param_hint="--seq-len")
    return values


def _progress_line(status: Any):
    """Turn the planner's progress notes into one live status line: phase, best objective, gap, time."""
    import time

    started = time.monotonic()

    def note(phase: str, info: dict) -> None:
        text = f"[bold]{phase}[/bold]"
        for unit, show in (("ns", lambda v: f"{v / 1e6:.2f} ms recompute"),
                           ("flops", lambda v: f"{format_flops(int(v))} recomputed")):
            if f"objective_{unit}" in info:
                obj = info[f"objective_{unit}"]
                bound = info.get(f"bound_{unit}", obj)
                text += f"  best {show(obj)}, gap {100 * ((obj - bound) / obj if obj else 0.0):.1f}%"
        if "regions" in info:
            text += f"  {info['regions']} candidate regions"
        status.update(f"{text}  ({time.monotonic() - started:.1f} s)")

    return note


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None


@app.command()
def solve(
    budget: Annotated[str, typer.Option(
        "--budget", "-b", help="Peak memory of one training step: 8GB (10^9 B), 8GiB (2^30 B), bytes, "
                               "or 70% of the no-checkpointing peak.")],
    model: ModelOpt = None,
    arg: ArgOpt = None,
    optimizer: OptimizerOpt = None,
    parallel: ParallelOpt = None,
    world_size: WorldOpt = 1,
    seq_len: SeqLenOpt = None,
    objective: ObjectiveOpt = "time",
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="Where to write the plan (default: plans/FACTORY-BUDGET.yaml).")] = None,
    time_limit: Annotated[float, typer.Option(help="Solver time limit in seconds.")] = 30.0,
    reserve: Annotated[Optional[float], typer.Option(
        help="Fraction of the budget kept free for allocator slack and what tracing cannot see "
             "(default: 0 for one process traced on CPU; 0.02 on a GPU, meta or fake tensors, DDP or FSDP).",
        show_default=False)] = None,
    gap: Annotated[float, typer.Option(
        help="Stop once the plan is proven within this fraction of the cheapest (0: prove it optimal).")
    ] = DEFAULT_GAP,
    remat: RematOpt = True,
    target: TargetOpt = None,
    gpu: GpuOpt = None,
    sdpa: SdpaOpt = None,
    autocast: AutocastOpt = None,
    profile: ProfileOpt = None,
    server: Annotated[Optional[str], typer.Option(
        help="Solve on this `ckptplan serve` server (http://HOST:PORT), which answers identical requests from "
             "its cache; the plan file is the one a local solve writes. Token: CKPTPLAN_TOKEN.")] = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Trace one training step and write the cheapest checkpointing plan that fits the budget."""
    from .planner import check_options, solve as solve_plan

    quiet = quiet or as_json
    try:
        where = _where(target, gpu, sdpa, autocast)
        budget_given, budget = budget, _card_budget(budget, where)
        parse_budget(budget, reference_bytes=SYNTAX_REFERENCE)  # a typo fails before the trace, not after
        check_options(reserve=reserve, gap=gap)  # before the trace, like the budget
        _check_time_limit(time_limit)
        if output is not None:
            _check_output(output, "-o")
        loaded, graph = _trace(model, arg, optimizer, quiet, parallel, world_size, _seq_lens(seq_len), where)
        with err.status("solving...", spinner="dots") if not quiet else _null() as status:
            plan = solve_plan(graph, budget, time_limit_s=time_limit, reserve=reserve, objective=objective,
                              gap=gap, rematerialize=remat, profile=profile, server=server,
                              progress=_progress_line(status) if status is not None else None)
        path = output or Path("plans") / f"{loaded.name}-{re.sub(r'[^A-Za-z0-9.]+', '', budget_given)}.yaml"
        _write(path, "-o", lambda: plan.save(path))
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
            err.print(escape(f"{what}: {format_bytes(e.minimum_bytes)}; try: ckptplan solve {' '.join(again)}"),
                      highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        _fail(e, as_json)
        return
    except CkptplanError as e:
        _fail(e, as_json)
        return
    except KeyboardInterrupt:
        # Ctrl-C inside CP-SAT stops the search and keeps the best plan; elsewhere nothing is written.
        err.print("interrupted: no plan written")
        raise typer.Exit(130) from None
    if as_json:
        print(json.dumps({**report.plan_summary(plan), "fits_without_checkpointing": not plan.regions,
                          "plan_file": str(path)}, indent=2))
    elif not quiet:
        primary = graph if not isinstance(graph, list) else graph[0]
        err.print(_fits_without(plan, path) if not plan.regions else escape(
            report.answer(plan, forward_cost_ns=primary.forward_cost_ns)), highlight=False)
        err.print(report.summary_table(plan, str(path), forward_cost_ns=primary.forward_cost_ns))
        if plan.device == "cuda":
            err.print(report.cuda_memory_note(primary, plan), highlight=False)


def _fits_without(plan: Any, path: Path) -> str:
    """The answer for a budget at or above the unplanned peak: no checkpointing is needed."""
    kept = f" less the {plan.reserve:.0%} reserve" if plan.reserve else ""
    return escape(f"fits without checkpointing: the peak without checkpointing, "
                  f"{format_bytes(plan.baseline_peak_bytes)}, is within the budget {format_bytes(plan.budget_bytes)}"
                  f"{kept}; the plan {path} checkpoints nothing, so applying it leaves the model as it is")


@app.command()
def sweep(
    budgets: Annotated[str, typer.Option(
        "--budgets", help="Comma-separated budgets, e.g. 60%,50%,40% or 6GB,5GB (same syntax as --budget).")],
    model: ModelOpt = None,
    arg: ArgOpt = None,
    optimizer: OptimizerOpt = None,
    objective: ObjectiveOpt = "time",
    time_limit: Annotated[float, typer.Option(help="Solver time limit in seconds, per budget.")] = 30.0,
    reserve: Annotated[Optional[float], typer.Option(
        help="Fraction of each budget kept free, applied to every policy alike (default: as solve's).",
        show_default=False)] = None,
    plot: Annotated[Optional[Path], typer.Option(
        help="Also write a plot to this file (.png, .pdf, .svg, ...): estimated step-time overhead and extra "
             "FLOPs against peak memory, budgets as lines (needs matplotlib: pip install 'ckptplan\\[plot]').")
    ] = None,
    remat: RematOpt = True,
    target: TargetOpt = None,
    gpu: GpuOpt = None,
    sdpa: SdpaOpt = None,
    autocast: AutocastOpt = None,
    profile: ProfileOpt = None,
    server: Annotated[Optional[str], typer.Option(
        help="Sweep on this `ckptplan serve` server, which caches the rows (and draws the plot on its page).")] = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Compare ckptplan with full, every-k-th-block and torchtitan-style op checkpointing at several
    budgets, all predicted by the simulator (`ckptplan verify` and benchmarks/run.py measure)."""
    from .compare import pareto_plot, sweep as sweep_policies

    quiet = quiet or as_json
    items = [b.strip() for b in budgets.split(",") if b.strip()]
    try:
        if not items:
            raise InputError("--budgets needs at least one budget, e.g. --budgets 60%,50%,40%")
        for b in items:
            parse_budget(b, reference_bytes=SYNTAX_REFERENCE)  # a typo fails before the trace
        _check_time_limit(time_limit)
        if plot is not None:
            _require_extra("plot", "--plot")
            if plot.suffix.lower().lstrip(".") not in PLOT_FORMATS:
                raise InputError(f"--plot {plot}: give a file ending in one of .{', .'.join(PLOT_FORMATS)}, "
                                 "e.g. pareto.png")
            _check_output(plot, "--plot")
        _, graph = _trace(model, arg, optimizer, quiet, where=_where(target, gpu, sdpa, autocast))
        if profile is not None:
            from .planner import _priced

            graph = _priced(graph, profile)[0]
        with err.status("solving each budget...", spinner="dots") if not quiet else _null():
            if server is None:
                rows = sweep_policies(graph, items, time_limit_s=time_limit, reserve=reserve, objective=objective,
                                      rematerialize=remat)
            else:
                from .serve.client import sweep_remote

                rows = sweep_remote(graph, items, server=server, time_limit_s=time_limit, reserve=reserve,
                                    objective=objective, rematerialize=remat)
        if plot is not None:
            _write(plot, "--plot", lambda: pareto_plot(rows, plot, title=f"{graph.model_name}: predicted",
                                                       forward_flops=graph.forward_flops,
                                                       forward_cost_ns=graph.forward_cost_ns))
    except CkptplanError as e:
        _fail(e, as_json)
        return
    except KeyboardInterrupt:
        _interrupted()
    if as_json:
        print(json.dumps({"model": graph.model_name, "forward_flops": graph.forward_flops,
                          "no_checkpointing_peak_bytes": graph.baseline_peak_bytes,
                          "rows": [asdict(r) for r in rows], "plot": str(plot) if plot else None}, indent=2))
    elif not quiet:
        for line in report.sweep_answer(rows, forward_flops=graph.forward_flops):
            err.print(escape(line), highlight=False)
        err.print(report.sweep_table(rows, forward_flops=graph.forward_flops))
        if plot is not None:
            err.print(f"plot written to {plot}")


@app.command("fit")
def fit_cmd(
    budget: Annotated[str, typer.Option(
        "--budget", "-b", help="Peak memory of one training step: 80GB (10^9 B), 80GiB (2^30 B) or bytes "
                               "(not a percentage: the unplanned peak changes with the value).")],
    vary: Annotated[str, typer.Option(
        help="The factory argument to search over, e.g. batch_size or seq_len.")],
    model: ModelOpt = None,
    arg: ArgOpt = None,
    optimizer: OptimizerOpt = None,
    start: Annotated[int, typer.Option(help="The smallest value tried (the search doubles it from here).")] = 1,
    max_value: Annotated[Optional[int], typer.Option(
        "--max", help="The largest value tried (default: 2^20).", show_default=False)] = None,
    multiple_of: Annotated[int, typer.Option(help="Try multiples of this only (e.g. 64 for seq_len).")] = 1,
    objective: ObjectiveOpt = "time",
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="Where to write the plan of the largest value that fits "
                               "(default: plans/FACTORY-ARGVALUE-BUDGET.yaml).")] = None,
    time_limit: Annotated[float, typer.Option(help="Solver time limit in seconds, per value and search.")] = 30.0,
    reserve: Annotated[Optional[float], typer.Option(
        help="Fraction of the budget kept free (default: as solve's).", show_default=False)] = None,
    gap: Annotated[float, typer.Option(
        help="Stop once each plan is proven within this fraction of the cheapest.")] = DEFAULT_GAP,
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
    from .fit import DEFAULT_LIMIT, fit as fit_search
    from .modelspec import call_factory, check_factory_argument, load_factory
    from .planner import check_options

    quiet = quiet or as_json
    try:
        if not vary.isidentifier():
            raise InputError(f"--vary {vary!r} must name a factory argument, e.g. --vary batch_size")
        where = _where(target, gpu, sdpa, autocast)
        budget_given, budget = budget, _card_budget(budget, where)
        parse_budget(budget, reference_bytes=SYNTAX_REFERENCE)  # a typo fails before any trace
        check_options(reserve=reserve, gap=gap)
        _check_time_limit(time_limit)
        if output is not None:
            _check_output(output, "-o")
        factory_kwargs = parse_factory_args(arg or [])
        if vary in factory_kwargs:
            raise InputError(f"--vary {vary} sets {vary}; drop -a {vary}={factory_kwargs[vary]} (use --start and "
                             "--max to bound the search)")
        from . import _compat  # noqa: F401  first: names any torch internal this torch lacks
        from .trace import trace

        name, factory = load_factory(model or bundled_example())
        check_factory_argument(name, factory, vary)

        def build(value: int):
            if status is not None:
                status.update(f"{vary}={value}: tracing one training step and solving...")
            loaded = call_factory(name, factory, {**factory_kwargs, vary: value})
            with _model_code(name):
                return trace(loaded.model, *loaded.args, optimizer=optimizer, model_name=name, **where,
                             **loaded.kwargs)

        def tried(trial: Any) -> None:
            if not quiet:
                cost = ("does not fit" if not trial.fits else "fits without checkpointing" if not trial.plan.regions
                        else f"fits, +{100 * trial.step_time_fraction:.1f}% estimated step time")
                err.print(f"{vary}={trial.value}: {cost}", highlight=False)

        with err.status("searching...", spinner="dots") if not quiet else _null() as status:
            result = fit_search(build, budget, argument=vary, start=start,
                                limit=DEFAULT_LIMIT if max_value is None else max_value, multiple_of=multiple_of,
                                time_limit_s=time_limit, reserve=reserve, objective=objective, gap=gap,
                                rematerialize=remat, progress=tried)
        best = result.best
        plan, fraction = best.plan, best.step_time_fraction
        assert plan is not None and fraction is not None  # FitResult's best trial fits
        tag = re.sub(r"[^A-Za-z0-9.]+", "", budget_given)
        path = output or Path("plans") / f"{name}-{vary}{best.value}-{tag}.yaml"
        _write(path, "-o", lambda: plan.save(path))
    except CkptplanError as e:
        _fail(e, as_json)
        return
    except KeyboardInterrupt:
        _interrupted("no plan written")
    if as_json:
        print(json.dumps({**report.fit_summary(result), "plan_file": str(path)}, indent=2))
    elif not quiet:
        more = f"; the largest value tried (--max {result.limit}): larger ones may fit" if result.at_limit else ""
        err.print(escape(f"largest {vary} that fits {format_bytes(result.budget_bytes)}: {best.value} (peak "
                         f"{format_bytes(plan.predicted_peak_bytes)}, +{100 * fraction:.1f}% "
                         f"estimated step time, +{100 * plan.extra_forward_fraction:.1f}% forward FLOPs; "
                         f"checkpoints {report.regions_text(plan) if plan.regions else 'nothing'}){more}; plan "
                         f"written to {path}"), highlight=False)
        err.print(report.fit_table(result))


@app.command("trace")
def trace_cmd(model: ModelOpt = None, arg: ArgOpt = None, optimizer: OptimizerOpt = None,
              parallel: ParallelOpt = None, world_size: WorldOpt = 1, target: TargetOpt = None,
              gpu: GpuOpt = None, sdpa: SdpaOpt = None, autocast: AutocastOpt = None,
              breakdown: Annotated[bool, typer.Option(
                  "--breakdown", help="Also print what is alive at the peak: by kind, activations by module, "
                                      "the largest tensors (as `ckptplan explain` does for a plan).")] = False,
              as_json: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """Trace one training step and print its memory facts: peaks, FLOPs, candidate regions and
    rematerializations."""
    from .planner import full_checkpointing
    from .solver.regions import candidate_regions
    from .solver.remat import remat_candidates
    from .solver.simulate import simulate

    try:
        _, graph = _trace(model, arg, optimizer, quiet or as_json, parallel, world_size,
                          where=_where(target, gpu, sdpa, autocast))
    except CkptplanError as e:
        _fail(e, as_json)
        return
    except KeyboardInterrupt:
        _interrupted("nothing traced")
    regions = candidate_regions(graph)
    full = simulate(graph, regions, full_checkpointing(graph, regions))
    info = report.graph_summary(graph, regions=len(regions), full_peak=full.peak_bytes,
                                remats=len(remat_candidates(graph, regions)))
    peak = None
    if breakdown:
        from .explain import as_dict, explain as explain_peak

        peak = explain_peak(graph)[0]
        info["breakdown"] = as_dict(peak)
    if as_json:
        print(json.dumps(info, indent=2))
    elif not quiet:
        info.pop("breakdown", None)
        err.print(report.graph_table(info))
        for part in report.explain_tables(graph, peak) if peak is not None else ():
            err.print(part, highlight=False)


@app.command()
def explain(
    plan_file: Annotated[Path, typer.Argument(help="A plan written by `ckptplan solve`.")],
    model: ModelOpt = None,
    arg: ArgOpt = None,
    depth: Annotated[Optional[int], typer.Option(
        help="Charge activations to modules this many path components deep (3: transformer.h.3).",
        show_default=False)] = None,
    top: Annotated[int, typer.Option(help="How many of the largest tensors alive at the peak to list.")] = 10,
    as_json: JsonOpt = False,
) -> None:
    """What makes the peak, with and without the plan: parameters, gradients, optimizer state, activations
    by module (identical layers folded), and the largest tensors alive there. Traces the model the plan is
    for (--model, -a as for solve); the parts sum to the plan's predicted peak."""
    from .explain import as_dict, explain as explain_peak
    from .planner import check_plan

    try:
        _check_depth(depth)
        plan = load_plan(plan_file)
        mode, _, world = plan.parallel.partition(":")
        _, graph = _trace(model, arg, plan.optimizer, as_json, mode or None, int(world or 1),
                          where=_plan_where(plan))
        check_plan(graph, plan)
        without, planned = explain_peak(graph, plan, depth=depth, top=top)
    except CkptplanError as e:
        _fail(e, as_json)
        return
    except KeyboardInterrupt:
        _interrupted("nothing explained")
    assert planned is not None  # explain() was given the plan
    if as_json:
        print(json.dumps({"model": graph.model_name, "budget_bytes": plan.budget_bytes,
                          "no_checkpointing": as_dict(without), "plan": as_dict(planned)}, indent=2))
        return
    out = _console()
    for part in report.explain_tables(graph, without, planned, plan=plan, depth=depth):
        out.print(part, highlight=False)


def _check_depth(depth: int | None) -> None:
    if depth is not None and depth < 1:
        raise typer.BadParameter(f"give a depth of 1 or more, e.g. 3 (not {depth})", param_hint="--depth")


@app.command()
def show(
    plan_file: Annotated[Path, typer.Argument(help="A plan written by `ckptplan solve`.")],
    ops: Annotated[bool, typer.Option("--ops", help="Also list every op of each region and its decision.")] = False,
    sort: Annotated[str, typer.Option(help="Op row order inside a region (--ops): order, bytes or flops.")] = "order",
    fold: Annotated[bool, typer.Option(help="Fold identical layers into one group.")] = True,
    model: Annotated[Optional[str], typer.Option(
        "--model", "-m", help="Also trace this model and re-simulate the plan's decisions on it "
                              "(catches hand edits that no longer fit).")] = None,
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
            from .planner import check_plan

            mode, _, world = plan.parallel.partition(":")
            loaded, graph = _trace(model, arg, plan.optimizer, True, mode or None, int(world or 1),
                                   where=_plan_where(plan))
            resimulated, forward_ns = (loaded.name, check_plan(graph, plan)), graph.forward_cost_ns
    except CkptplanError as e:
        _fail(e, as_json)
        return
    except KeyboardInterrupt:
        _interrupted("nothing shown")
    if as_json:
        extra = {} if resimulated is None else {"resimulated_peak_bytes": resimulated[1].peak_bytes}
        print(json.dumps({**report.plan_summary(plan), **extra}, indent=2))
        return
    out = _console()
    out.print(escape(report.answer(plan, forward_cost_ns=forward_ns)), highlight=False)
    if resimulated is not None:
        name, sim = resimulated
        out.print(escape(f"re-simulated on {name} as traced now: peak {format_bytes(sim.peak_bytes)} (the plan "
                         f"says {format_bytes(plan.predicted_peak_bytes)}), within its budget"), highlight=False)
    out.print(report.summary_table(plan, str(plan_file), forward_cost_ns=forward_ns))
    out.print(report.regions_table(plan, fold=fold))
    for table in report.decisions_tables(plan, sort=sort, fold=fold) if ops else ():
        out.print(table)


@app.command()
def diff(a: Annotated[Path, typer.Argument(help="First plan.")],
         b: Annotated[Path, typer.Argument(help="Second plan.")],
         ops: Annotated[bool, typer.Option("--ops", help="List every op whose decision changed.")] = False,
         as_json: JsonOpt = False) -> None:
    """Show what changed between two plans: peaks, FLOPs, checkpointed regions (folded), op decisions."""
    try:
        d = report.diff_plans(load_plan(a), load_plan(b))
    except CkptplanError as e:
        _fail(e, as_json)
        return
    if as_json:
        print(json.dumps(d, indent=2))
    else:
        _console().print(report.diff_table(d, ops=ops))


def _console() -> Console:
    """Rich output on stderr at the terminal's width (COLUMNS where set; 80 when piped)."""
    return err


@app.command()
def verify(
    plan_file: Annotated[Path, typer.Argument(help="A plan written by `ckptplan solve`.")],
    model: ModelOpt = None,
    arg: ArgOpt = None,
    steps: Annotated[int, typer.Option(
        help="Training steps timed without and with the plan (the median of each, after one warm-up step); "
             "0 measures no step time.")] = 3,
    as_json: JsonOpt = False,
) -> None:
    """Run real steps with the plan applied: measured against predicted peak and extra FLOPs, and the step
    time against the unplanned model's.

    Exits 6 when the measured peak exceeds the plan's budget.
    """
    from .measure import measure_peak, measure_step_ns
    from .planner import check_plan
    from .runtime import apply, check_model
    from .trace import trace

    try:
        if steps < 0:
            raise typer.BadParameter(f"give 0 or more steps, e.g. 3 (not {steps})", param_hint="--steps")
        plan = load_plan(plan_file)
        if plan.parallel:
            raise InputError(f"verify runs one process, but this plan is per rank of {plan.parallel}: measure "
                             "it inside the distributed job (FSDPMemTracker), as benchmarks/parallel_memory.py does")
        loaded = load_model(model or bundled_example(), parse_factory_args(arg or []))
        check_model(loaded.model, plan)
        with _model_code(loaded.name):
            graph = trace(loaded.model, *loaded.args, optimizer=plan.optimizer, model_name=loaded.name,
                          **_plan_where(plan), **loaded.kwargs)
            check_plan(graph, plan)  # a hand-edited plan that no longer fits stops here
        autocast = plan.autocast or None
        timing = err.status(f"timing {steps} steps without the plan...", spinner="dots")
        with timing if steps and not as_json else _null(), _model_code(loaded.name):
            plain_ns = measure_step_ns(loaded.model, *loaded.args, steps=steps, autocast=autocast,
                                       **loaded.kwargs) if steps else None
        handle = apply(loaded.model, plan)
        try:
            with _model_code(loaded.name):
                peak = measure_peak(loaded.model, *loaded.args, autocast=autocast, **loaded.kwargs)
                extra = handle.stats.extra_forward_flops
                planned_ns = measure_step_ns(loaded.model, *loaded.args, steps=steps, autocast=autocast,
                                             **loaded.kwargs) if steps else None
        finally:
            handle.remove()
    except CkptplanError as e:
        _fail(e, as_json)
        return
    except KeyboardInterrupt:
        _interrupted("nothing measured")
    fits = peak <= plan.budget_bytes
    estimated = report.step_fraction(plan, graph.forward_cost_ns)
    result = {"budget_bytes": plan.budget_bytes, "predicted_peak_bytes": plan.predicted_peak_bytes,
              "measured_peak_bytes": peak, "fits": fits,
              "measured_over_predicted":
                  round(peak / plan.predicted_peak_bytes, 4) if plan.predicted_peak_bytes else None,
              "predicted_extra_forward_flops": plan.extra_forward_flops, "measured_extra_forward_flops": extra,
              "steps_timed": steps, "step_ns_without_plan": plain_ns, "step_ns_with_plan": planned_ns,
              "measured_step_time_percent":
                  round(100 * (planned_ns - plain_ns) / plain_ns, 2) if plain_ns and planned_ns else None,
              "estimated_step_time_percent": round(100 * estimated, 2)}
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        err.print(escape(f"peak: predicted {format_bytes(plan.predicted_peak_bytes)}, measured {format_bytes(peak)} "
                         f"(budget {format_bytes(plan.budget_bytes)}: {'fits' if fits else 'EXCEEDED'}); "
                         f"extra forward FLOPs: predicted {format_flops(plan.extra_forward_flops)}, recomputed "
                         f"{format_flops(extra)}"), highlight=False)
        if plain_ns and planned_ns:
            err.print(escape(f"step time: {report.format_ns(plain_ns)} without the plan, "
                             f"{report.format_ns(planned_ns)} with it: "
                             f"{result['measured_step_time_percent']:+.1f}% (median of {steps} steps each; "
                             f"estimated +{100 * estimated:.1f}%)"), highlight=False)
    if not fits:
        raise typer.Exit(6)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to bind; any but loopback needs --token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8750,
    store: Annotated[Path, typer.Option(help="SQLite file of the plan cache (created if missing).")] = Path(
        "ckptplan-plans.sqlite"),
    workers: Annotated[int, typer.Option(help="Solver processes (solves run in parallel).")] = 1,
    queue: Annotated[int, typer.Option(help="Distinct solves waiting or running before requests get 503.")] = 16,
    token: Annotated[Optional[str], typer.Option(
        envvar="CKPTPLAN_TOKEN", show_envvar=True, help="Bearer token every request but /healthz must send.")] = None,
) -> None:
    """Serve plans over HTTP: one solve per distinct request, cached in SQLite, a review page at /.
    Needs FastAPI and uvicorn: pip install 'ckptplan\\[serve]'."""
    try:
        _require_extra("serve", "ckptplan serve")
        from .serve.app import Config, serve as run_server
    except CkptplanError as e:
        _fail(e, False)
        return
    except ImportError as e:
        _fail(InputError(f"ckptplan serve could not import its server ({e}); reinstall it with "
                         "pip install 'ckptplan[serve]'"), False)
        return
    try:
        run_server(host=host, port=port, config=Config(store=str(store), workers=workers, queue_limit=queue,
                                                         token=token or None))
    except CkptplanError as e:
        _fail(e, False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
