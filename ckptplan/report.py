"""Rendering for humans (rich tables) and machines (JSON-ready dicts). No computation lives here."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from .graph import Graph
from .plan import Decision, Plan, fold_paths, fold_regions
from .units import describe_budget, format_bytes, format_flops


def plan_summary(plan: Plan) -> dict[str, Any]:
    return {
        "model": plan.model,
        "fingerprint": plan.fingerprint,
        "budget_bytes": plan.budget_bytes,
        "budget": plan.budget_text,
        "reserve": plan.reserve,
        "no_checkpointing_peak_bytes": plan.baseline_peak_bytes,
        "full_checkpointing_peak_bytes": plan.full_peak_bytes,
        "predicted_peak_bytes": plan.predicted_peak_bytes,
        "forward_flops": plan.forward_flops,
        "extra_forward_flops": plan.extra_forward_flops,
        "extra_forward_percent": round(100 * plan.extra_forward_fraction, 3),
        "estimated_recompute_ns": plan.extra_cost_ns,
        "objective": plan.objective,
        "status": plan.status,
        "gap": plan.gap,
        "solve_time_s": round(plan.solve_time_s, 3),
        "checkpointed_regions": [r.path for r in plan.regions if not r.remat],
        "rematerialized": [r.path for r in plan.regions if r.remat],
    }


def summary_table(plan: Plan, path: str | None = None) -> Table:
    t = Table(title=f"ckptplan: {plan.model}", show_header=False, title_justify="left")
    t.add_column("what", style="bold")
    t.add_column("value")
    t.add_row("budget", f"{plan.budget_text} = {describe_budget(plan.budget_bytes)}"
              + (f" ({plan.reserve:.0%} kept free)" if plan.reserve else ""))
    t.add_row("peak, no checkpointing", format_bytes(plan.baseline_peak_bytes))
    t.add_row("peak, full checkpointing", format_bytes(plan.full_peak_bytes))
    t.add_row("peak, this plan", f"[green]{format_bytes(plan.predicted_peak_bytes)}[/green]")
    t.add_row("extra forward FLOPs", f"{format_flops(plan.extra_forward_flops)} "
              f"({100 * plan.extra_forward_fraction:.1f}% of {format_flops(plan.forward_flops)} forward)")
    t.add_row("estimated recompute time", f"{plan.extra_cost_ns / 1e6:.2f} ms")
    t.add_row("checkpointed regions", f"{sum(not r.remat for r in plan.regions)}")
    t.add_row("rematerialized tensors", f"{sum(r.remat for r in plan.regions)}")
    t.add_row("solver", f"{plan.status} (minimising {plan.objective}), gap {100 * plan.gap:.2f}%, "
              f"{plan.solve_time_s:.1f} s")
    if path:
        t.add_row("plan file", path)
    return t


def decisions_table(plan: Plan, *, sort: str = "order", fold: bool = True) -> Table:
    t = Table(title="decisions (op rows of each group of identical regions)", title_justify="left")
    for name, justify in [("regions", "left"), ("#", "right"), ("op", "left"), ("module", "left"),
                          ("shape", "left"), ("dtype", "left"), ("bytes", "right"), ("decision", "left"),
                          ("recompute FLOPs", "right"), ("recompute µs", "right"), ("forced by", "left")]:
        t.add_column(name, justify=justify)  # type: ignore[arg-type]  # str, not rich's JustifyMethod literal
    groups = fold_regions(plan.regions) if fold else [([r.path], r) for r in plan.regions]
    for paths, r in groups:
        rows = list(enumerate(r.ops))
        if sort == "bytes":
            rows.sort(key=lambda x: -x[1].nbytes)
        elif sort == "flops":
            rows.sort(key=lambda x: -x[1].recompute_flops)
        label = f"{fold_paths(paths)} ({r.type_name} x{len(paths)})"
        for n, (i, o) in enumerate(rows):
            color = "green" if o.decision is Decision.SAVE else "yellow"
            t.add_row(label if n == 0 else "", str(i), o.op.removeprefix("aten."), o.module or ".",
                      ", ".join("x".join(map(str, s)) for s in o.shape),
                      o.dtype, format_bytes(o.nbytes), f"[{color}]{o.decision.value}[/{color}]",
                      format_flops(o.recompute_flops) if o.recompute_flops else "",
                      f"{o.recompute_ns / 1e3:.1f}" if o.recompute_ns else "", o.forced or "")
        t.add_section()
    return t


def diff_plans(a: Plan, b: Plan) -> dict[str, Any]:
    """What changed from plan ``a`` to plan ``b``: header numbers, regions, op decisions."""
    sa, sb = plan_summary(a), plan_summary(b)
    header = {k: [sa[k], sb[k]] for k in sa if k not in ("checkpointed_regions", "rematerialized") and sa[k] != sb[k]}
    ra, rb = {r.path: r for r in a.regions}, {r.path: r for r in b.regions}
    ops = []
    for path in sorted(set(ra) & set(rb)):
        for i, (x, y) in enumerate(zip(ra[path].ops, rb[path].ops)):
            if x.decision is not y.decision or x.op != y.op:
                ops.append({"region": path, "index": i, "op": y.op, "module": y.module,
                            "from": x.decision.value, "to": y.decision.value, "bytes": y.nbytes})
    return {
        "same_model": a.fingerprint == b.fingerprint,
        "header": header,
        "regions_added": sorted(set(rb) - set(ra)),
        "regions_removed": sorted(set(ra) - set(rb)),
        "ops_changed": ops,
    }


def diff_table(d: dict[str, Any]) -> Table:
    t = Table(title="plan diff", title_justify="left")
    t.add_column("what")
    t.add_column("A")
    t.add_column("B")
    if not d["same_model"]:
        t.add_row("[red]fingerprint[/red]", "differs", "plans are for different models or inputs")
    for k, (x, y) in d["header"].items():
        fmt = format_bytes if k.endswith("bytes") else format_flops if k.endswith("flops") else str
        t.add_row(k, fmt(x) if isinstance(x, int) else str(x), fmt(y) if isinstance(y, int) else str(y))
    if d["regions_added"]:
        t.add_row("checkpointed only in B", "", fold_paths(d["regions_added"]))
    if d["regions_removed"]:
        t.add_row("checkpointed only in A", fold_paths(d["regions_removed"]), "")
    for o in d["ops_changed"]:
        t.add_row(f"{o['region']} #{o['index']} {o['op'].removeprefix('aten.')} {o['module']}",
                  o["from"], o["to"])
    return t


def graph_summary(graph: Graph, *, regions: int, full_peak: int, remats: int = 0) -> dict[str, Any]:
    return {
        "model": graph.model_name,
        "fingerprint": graph.fingerprint,
        "inputs": list(graph.inputs),
        "device": graph.device,
        **({"gpu": graph.gpu, "attention_kernels": list(graph.sdpa_backends)} if graph.gpu else {}),
        **({"autocast": graph.autocast} if graph.autocast else {}),
        "traced_on": graph.traced_on,
        "forward_ops": graph.num_forward,
        "events": graph.num_events,
        "parameters": graph.num_parameters,
        "parameter_bytes": graph.param_bytes,
        "optimizer_state_bytes": graph.optimizer_state_bytes,
        "parallel": graph.parallel or "none",
        "extra_fixed_bytes": graph.extra_fixed_bytes,
        "forward_flops": graph.forward_flops,
        "no_checkpointing_peak_bytes": graph.baseline_peak_bytes,
        "full_checkpointing_peak_bytes": full_peak,
        "candidate_regions": regions,
        "rematerialization_candidates": remats,
    }


def graph_table(info: dict[str, Any]) -> Table:
    t = Table(title=f"ckptplan trace: {info['model']}", show_header=False, title_justify="left")
    t.add_column("what", style="bold")
    t.add_column("value")
    for k, v in info.items():
        if k == "model":
            continue
        if k.endswith("bytes"):
            v = format_bytes(v)
        elif k.endswith("flops"):
            v = format_flops(v)
        elif isinstance(v, list):
            v = ", ".join(map(str, v))
        t.add_row(k.replace("_", " "), str(v))
    return t


def sweep_table(rows: list, *, forward_flops: int) -> Table:
    """``compare.sweep`` rows: one section per budget, ckptplan first."""
    t = Table(title="predicted, per budget: ckptplan and the cheapest fitting knob of each policy "
                    "(fits = peak under the budget less the reserve)", title_justify="left")
    for name, justify in [("budget", "left"), ("policy", "left"), ("knob", "left"), ("peak", "right"),
                          ("extra forward FLOPs", "right"), ("% of forward", "right"),
                          ("est. recompute ms", "right"), ("note", "left")]:
        t.add_column(name, justify=justify)  # type: ignore[arg-type]  # str, not rich's JustifyMethod literal
    last = None
    for r in rows:
        if last is not None and r.budget != last:
            t.add_section()
        first = r.budget != last
        last = r.budget
        label = f"{r.budget} = {format_bytes(r.budget_bytes)}" if first else ""
        name = f"[bold]{r.policy}[/bold]" if r.policy == "ckptplan" else r.policy
        if not r.fits:
            t.add_row(label, name, r.knob, "[red]does not fit[/red]", "", "", "", r.note)
            continue
        t.add_row(label, name, r.knob, format_bytes(r.peak_bytes), format_flops(r.extra_forward_flops),
                  f"{100 * r.extra_forward_flops / forward_flops:.1f}" if forward_flops else "",
                  f"{r.extra_cost_ns / 1e6:.2f}", r.note)
    return t


def cuda_memory_note(graph: Graph, plan: Plan) -> str:
    """What a cuda plan's peak covers, and estimates of what it does not."""
    from .target import CUDA_CONTEXT_BYTES, reserved_estimate

    timeline = graph.memory_timeline()
    at = max(range(len(timeline)), key=timeline.__getitem__) if timeline else 0
    live = [s.nbytes for s in graph.storages if max(s.alloc_event, 0) <= at < s.free_event]
    slack = max(0, reserved_estimate(live) - sum(live))  # segment rounding at the unplanned peak
    gpu = f" on {plan.gpu}" if plan.gpu else ""
    return (f"CUDA{gpu}: the peak is what torch.cuda.max_memory_allocated() reports (blocks rounded to 512 B, "
            f"cuBLAS workspace {format_bytes(graph.extra_fixed_bytes)} included); max_memory_reserved() about "
            f"{format_bytes(plan.predicted_peak_bytes + slack)} or more (allocator segments, estimate); the CUDA "
            f"context, about {format_bytes(CUDA_CONTEXT_BYTES)}, is counted by neither.")


def fit_summary(result: Any) -> dict[str, Any]:
    """A ``fit.FitResult`` as JSON: the largest value that fits, then every value tried, by value."""
    return {
        "argument": result.argument,
        "budget_bytes": result.budget_bytes,
        "best": result.best.value,
        "at_limit": result.at_limit,
        "trials": [{"value": t.value, "no_checkpointing_peak_bytes": t.no_checkpointing_peak_bytes,
                    "minimum_bytes": t.minimum_bytes, "minimum_proven": t.minimum_proven, "fits": t.fits,
                    "estimated_recompute_ns": t.plan.extra_cost_ns if t.plan else None,
                    "estimated_step_time_percent": round(100 * t.step_time_fraction, 3) if t.plan else None,
                    "extra_forward_percent": round(100 * t.plan.extra_forward_fraction, 3) if t.plan else None}
                   for t in result.by_value()],
    }


def fit_table(result: Any) -> Table:
    """The values a ``fit`` search tried, by value, the answer's row in bold: the no-checkpointing peak, the
    lowest budget a plan fits ("<=": not proven minimal), and the cost of the cheapest plan under the budget."""
    t = Table(title=f"values of {result.argument} tried, budget {format_bytes(result.budget_bytes)}",
              title_justify="left")
    for name, justify in [(result.argument, "right"), ("unplanned peak", "right"), ("minimum budget", "right"),
                          ("fits", "left"), ("est. step time", "right"), ("forward FLOPs", "right")]:
        t.add_column(name, justify=justify)  # type: ignore[arg-type]  # str, not rich's JustifyMethod literal
    for trial in result.by_value():
        minimum = "none found" if trial.minimum_bytes is None else (
            format_bytes(trial.minimum_bytes) if trial.minimum_proven else f"<= {format_bytes(trial.minimum_bytes)}")
        plan = trial.plan
        t.add_row(str(trial.value), format_bytes(trial.no_checkpointing_peak_bytes), minimum,
                  "[green]yes[/green]" if plan else "[red]no[/red]",
                  f"+{100 * trial.step_time_fraction:.1f}%" if plan else "",
                  f"+{100 * plan.extra_forward_fraction:.1f}%" if plan else "",
                  style="bold" if trial is result.best else None)
    return t


def explain_tables(graph: Graph, without: Any, planned: Any = None, *, plan: Plan | None = None,
                   depth: int | None = None) -> list[Any]:
    """``explain.explain``'s breakdowns: the answer in one line, then bytes by kind, activations by module
    (identical layers folded) and the largest tensors alive at the peak, without and with the plan."""
    from .explain import Kind, module_rows

    shown = [without] + ([planned] if planned is not None else [])
    heads = ["no checkpointing"] + (["this plan"] if planned is not None else [])
    if planned is not None and plan is not None:
        acts = [dict(b.by_kind)[Kind.ACTIVATIONS] for b in shown]
        lead = (f"peak {format_bytes(planned.peak_bytes)} with the plan (budget {format_bytes(plan.budget_bytes)}), "
                f"{format_bytes(without.peak_bytes)} without: {format_bytes(acts[0] - acts[1])} fewer activations "
                f"alive at the peak")
    else:
        lead = f"peak {format_bytes(without.peak_bytes)} without checkpointing ({without.peak_at})"
    kinds = Table(title="alive at the peak, by kind", title_justify="left")
    kinds.add_column("kind")
    for h in heads:
        kinds.add_column(h, justify="right")
    for i, (kind, _) in enumerate(without.by_kind):
        values = [b.by_kind[i][1] for b in shown]
        if any(values):
            kinds.add_row(kind.value, *map(format_bytes, values))
    kinds.add_section()
    kinds.add_row("[bold]peak[/bold]", *(f"[bold]{format_bytes(b.peak_bytes)}[/bold]" for b in shown))
    kinds.add_row("where", *(b.peak_at for b in shown))
    modules = Table(title="activations alive at the peak, by module (identical layers folded)", title_justify="left")
    modules.add_column("module", overflow="fold")
    modules.add_column("#", justify="right")
    for h in heads:
        modules.add_column(h, justify="right")
    for row in module_rows(graph, *shown, depth=depth):
        modules.add_row(row.label, str(row.modules), *(format_bytes(n) if n else "-" for n in row.nbytes))
    last = shown[-1]
    largest = Table(title=f"largest tensors alive at the peak ({heads[-1]})", title_justify="left")
    for name, justify in [("kind", "left"), ("tensor", "left"), ("shape", "left"), ("bytes", "right")]:
        largest.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]  # str, not a Literal
    for t in last.largest:
        largest.add_row(t.kind.value, t.name, f"{t.dtype}[{t.shape}]" if t.shape else "", format_bytes(t.nbytes))
    return [lead, kinds, modules, largest]
