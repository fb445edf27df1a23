"""`verify` and `serve`: the commands that run a model or a server."""

from __future__ import annotations

# NOTE [ Lazy package ] (cli/__init__.py): torch and OR-Tools are imported inside the commands, never here.
import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from .. import report
from ..errors import CkptplanError, InputError
from ..modelspec import bundled_example, load_model, parse_factory_args
from ..plan import load_plan
from ..units import format_bytes, format_flops
from .common import (
    ArgOpt,
    JsonOpt,
    ModelOpt,
    err,
    fail,
    interrupted,
    model_code,
    null_status,
    plan_where,
    require_extra,
)


def verify(
    plan_file: Annotated[Path, typer.Argument(help="A plan written by `ckptplan solve`.")],
    model: ModelOpt = None,
    arg: ArgOpt = None,
    steps: Annotated[
        int,
        typer.Option(
            help="Training steps timed without and with the plan (the median of each, after one warm-up step); "
            "0 measures no step time."
        ),
    ] = 3,
    as_json: JsonOpt = False,
) -> None:
    """Run real steps with the plan applied: measured against predicted peak and extra FLOPs, and the step
    time against the unplanned model's.

    Exits 6 when the measured peak exceeds the plan's budget.
    """
    from ..decisions import check_plan
    from ..measure import measure_peak, measure_step_ns
    from ..runtime import apply, check_model
    from ..trace import trace

    try:
        if steps < 0:
            raise typer.BadParameter(f"give 0 or more steps, e.g. 3 (not {steps})", param_hint="--steps")
        plan = load_plan(plan_file)
        if plan.parallel:
            raise InputError(
                f"verify runs one process, but this plan is per rank of {plan.parallel}: measure "
                "it inside the distributed job (FSDPMemTracker), as benchmarks/parallel_memory.py does"
            )
        loaded = load_model(model or bundled_example(), parse_factory_args(arg or []))
        check_model(loaded.model, plan)
        with model_code(loaded.name):
            graph = trace(
                loaded.model,
                *loaded.args,
                optimizer=plan.optimizer,
                model_name=loaded.name,
                **plan_where(plan),
                **loaded.kwargs,
            )
            check_plan(graph, plan)  # a hand-edited plan that no longer fits stops here
        autocast = plan.autocast or None
        timing = err.status(f"timing {steps} steps without the plan...", spinner="dots")
        with timing if steps and not as_json else null_status(), model_code(loaded.name):
            plain_ns = (
                measure_step_ns(loaded.model, *loaded.args, steps=steps, autocast=autocast, **loaded.kwargs)
                if steps
                else None
            )
        handle = apply(loaded.model, plan)
        try:
            with model_code(loaded.name):
                peak = measure_peak(loaded.model, *loaded.args, autocast=autocast, **loaded.kwargs)
                extra = handle.stats.extra_forward_flops
                planned_ns = (
                    measure_step_ns(loaded.model, *loaded.args, steps=steps, autocast=autocast, **loaded.kwargs)
                    if steps
                    else None
                )
        finally:
            handle.remove()
    except CkptplanError as e:
        fail(e, as_json)
        return
    except KeyboardInterrupt:
        interrupted("nothing measured")
    fits = peak <= plan.budget_bytes
    estimated = report.step_fraction(plan, graph.forward_cost_ns)
    result = {
        "budget_bytes": plan.budget_bytes,
        "predicted_peak_bytes": plan.predicted_peak_bytes,
        "measured_peak_bytes": peak,
        "fits": fits,
        "measured_over_predicted": round(peak / plan.predicted_peak_bytes, 4) if plan.predicted_peak_bytes else None,
        "predicted_extra_forward_flops": plan.extra_forward_flops,
        "measured_extra_forward_flops": extra,
        "steps_timed": steps,
        "step_ns_without_plan": plain_ns,
        "step_ns_with_plan": planned_ns,
        "measured_step_time_percent": round(100 * (planned_ns - plain_ns) / plain_ns, 2)
        if plain_ns and planned_ns
        else None,
        "estimated_step_time_percent": round(100 * estimated, 2),
    }
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        err.print(
            escape(
                f"peak: predicted {format_bytes(plan.predicted_peak_bytes)}, measured {format_bytes(peak)} "
                f"(budget {format_bytes(plan.budget_bytes)}: {'fits' if fits else 'EXCEEDED'}); "
                f"extra forward FLOPs: predicted {format_flops(plan.extra_forward_flops)}, recomputed "
                f"{format_flops(extra)}"
            ),
            highlight=False,
        )
        if plain_ns and planned_ns:
            err.print(
                escape(
                    f"step time: {report.format_ns(plain_ns)} without the plan, "
                    f"{report.format_ns(planned_ns)} with it: "
                    f"{result['measured_step_time_percent']:+.1f}% (median of {steps} steps each; "
                    f"estimated +{100 * estimated:.1f}%)"
                ),
                highlight=False,
            )
    if not fits:
        raise typer.Exit(6)


def serve(
    host: Annotated[str, typer.Option(help="Address to bind; any but loopback needs --token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8750,
    store: Annotated[Path, typer.Option(help="SQLite file of the plan cache (created if missing).")] = Path(
        "ckptplan-plans.sqlite"
    ),
    workers: Annotated[int, typer.Option(help="Solver processes (solves run in parallel).")] = 1,
    queue: Annotated[int, typer.Option(help="Distinct solves waiting or running before requests get 503.")] = 16,
    token: Annotated[
        Optional[str],
        typer.Option(
            envvar="CKPTPLAN_TOKEN", show_envvar=True, help="Bearer token every request but /healthz must send."
        ),
    ] = None,
) -> None:
    """Serve plans over HTTP: one solve per distinct request, cached in SQLite, a review page at /.
    Needs FastAPI and uvicorn: pip install 'ckptplan\\[serve]'."""
    try:
        require_extra("serve", "ckptplan serve")
        from ..serve.app import Config, serve as run_server
    except CkptplanError as e:
        fail(e, False)
        return
    except ImportError as e:
        fail(
            InputError(
                f"ckptplan serve could not import its server ({e}); reinstall it with pip install 'ckptplan[serve]'"
            ),
            False,
        )
        return
    try:
        run_server(
            host=host,
            port=port,
            config=Config(store=str(store), workers=workers, queue_limit=queue, token=token or None),
        )
    except CkptplanError as e:
        fail(e, False)
