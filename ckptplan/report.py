"""Rendering for humans (rich tables) and machines (JSON-ready dicts). No computation lives here."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from .graph import Graph
from .names import fold_names, fold_paths, path_order
from .plan import Decision, Plan, fold_regions
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
        "objective": plan.objective.value,
        "status": plan.status.value,
        "gap": plan.gap,
        "solve_time_s": round(plan.solve_time_s, 3),
        "checkpointed_regions": [r.path for r in plan.regions if not r.remat],
        "rematerialized": [r.path for r in plan.regions if r.remat],
    }


STEP_PER_FORWARD = 3  # a step's estimated time: forward and a backward of about twice its cost (auto.py's)


def answer(plan: Plan, *, forward_cost_ns: int = 0) -> str:
    """The plan in one line: memory saved, peak against budget, estimated step-time cost, extra FLOPs and
    the regions it checkpoints (identical layers folded)."""
    budget = format_bytes(plan.budget_bytes)
    if not plan.regions:
        return (
            f"fits without checkpointing: peak {format_bytes(plan.baseline_peak_bytes)} within budget {budget}; "
            "nothing checkpointed"
        )
    cost = [f"+{100 * step_fraction(plan, forward_cost_ns):.1f}% est. step time"] if forward_cost_ns > 0 else []
    cost += [f"est. recompute {format_ns(plan.extra_cost_ns)}", f"+{100 * plan.extra_forward_fraction:.1f}% FLOPs"]
    return (
        f"saves {format_bytes(plan.baseline_peak_bytes - plan.predicted_peak_bytes)}: peak "
        f"{format_bytes(plan.predicted_peak_bytes)} of budget {budget} ({format_bytes(plan.baseline_peak_bytes)} "
        f"without checkpointing); {', '.join(cost)}; checkpoints {regions_text(plan)}"
    )


def step_fraction(plan: Plan, forward_cost_ns: int) -> float:
    """The plan's estimated recompute time as a fraction of the step's (forward and backward)."""
    return plan.extra_cost_ns / (STEP_PER_FORWARD * forward_cost_ns) if forward_cost_ns > 0 else 0.0


def regions_text(plan: Plan, *, most: int = 4) -> str:
    """The plan's checkpointed regions, folded ('transformer.h.{0-11}.mlp (12), ...'), and its remats."""
    names = fold_names(sorted((r.path for r in plan.regions if not r.remat), key=path_order))
    parts = [f"{label} ({len(members)})" if len(members) > 1 else label for label, members in names]
    more = f", and {len(parts) - most} more groups" if len(parts) > most else ""
    remats = sum(r.remat for r in plan.regions)
    text = (", ".join(parts[:most]) + more) if parts else "no module"
    return text + (f"; rematerializes {remats} tensors" if remats else "")


def format_ns(ns: int) -> str:
    """A duration for humans: '36.7 ms', '820 µs', '2.41 s'."""
    if ns >= 10**9:
        return f"{ns / 1e9:.2f} s"
    if ns >= 10**6:
        return f"{ns / 1e6:.1f} ms"
    return f"{ns / 1e3:.0f} µs"


def summary_table(plan: Plan, path: str | None = None, *, forward_cost_ns: int = 0) -> Table:
    t = Table(title=f"ckptplan: {plan.model}", show_header=False, title_justify="left")
    t.add_column("what", style="bold")
    t.add_column("value", overflow="fold")
    t.add_row(
        "budget",
        f"{plan.budget_text} = {describe_budget(plan.budget_bytes)}"
        + (f" ({plan.reserve:.0%} kept free)" if plan.reserve else ""),
    )
    t.add_row(
        "peak, this plan",
        f"[green]{format_bytes(plan.predicted_peak_bytes)}[/green], saves "
        f"{format_bytes(plan.baseline_peak_bytes - plan.predicted_peak_bytes)}",
    )
    t.add_row("peak, no checkpointing", format_bytes(plan.baseline_peak_bytes))
    t.add_row("peak, full checkpointing", format_bytes(plan.full_peak_bytes))
    if forward_cost_ns > 0:
        t.add_row("est. step time", f"+{100 * step_fraction(plan, forward_cost_ns):.1f}%")
    t.add_row("est. recompute", format_ns(plan.extra_cost_ns))
    t.add_row(
        "extra forward FLOPs",
        f"+{100 * plan.extra_forward_fraction:.1f}%: "
        f"{format_flops(plan.extra_forward_flops)} of {format_flops(plan.forward_flops)}",
    )
    t.add_row("checkpointed", f"{sum(not r.remat for r in plan.regions)} regions: {regions_text(plan, most=8)}")
    t.add_row(
        "solver",
        f"{plan.status.value} (minimising {plan.objective.value}), gap {100 * plan.gap:.2f}%"
        + (f", {plan.solve_time_s:.1f} s" if plan.solve_time_s > 0 else ""),
    )  # 0: loaded from a file
    if path:
        t.add_row("plan file", path)
    return t


def regions_table(plan: Plan, *, fold: bool = True) -> Table:
    """One row per group of identical regions (same ops, same decisions), in model order."""
    t = Table(title="regions (identical layers folded; --ops lists their ops)", title_justify="left")
    t.add_column("regions", overflow="fold", ratio=1)  # the room the numbers leave
    t.add_column("type", overflow="fold", max_width=18)
    for name in ("#", "rerun ops", "saved ops", "est. recompute"):
        t.add_column(name, justify="right", no_wrap=True)
    groups = fold_regions(plan.regions) if fold else [([r.path], r) for r in plan.regions]
    for paths, r in groups:  # forward order: model order
        rerun = sum(o.decision is Decision.RECOMPUTE for o in r.ops)
        t.add_row(
            fold_paths(paths),
            "remat" if r.remat else r.type_name,
            str(len(paths)),
            str(rerun),
            str(len(r.ops) - rerun),
            format_ns(sum(o.recompute_ns for o in r.ops)),
        )
    return t


def decisions_tables(plan: Plan, *, sort: str = "order", fold: bool = True) -> list[Table]:
    """One table per group of identical regions, titled by the group: its ops and their decisions."""
    out = []
    groups = fold_regions(plan.regions) if fold else [([r.path], r) for r in plan.regions]
    for paths, r in groups:
        t = Table(
            title=f"{fold_paths(paths)} ({'remat' if r.remat else r.type_name} x{len(paths)})", title_justify="left"
        )
        for name, justify in [
            ("#", "right"),
            ("op", "left"),
            ("module", "left"),
            ("shape", "left"),
            ("bytes", "right"),
            ("decision", "left"),
            ("µs", "right"),
            ("forced by", "left"),
        ]:
            t.add_column(
                name,
                justify=justify,  # type: ignore[arg-type]  # str, not a Literal
                overflow="fold",
                no_wrap=name in ("#", "shape", "bytes", "decision", "µs"),
            )
        rows = list(enumerate(r.ops))
        if sort == "bytes":
            rows.sort(key=lambda x: -x[1].nbytes)
        elif sort == "flops":
            rows.sort(key=lambda x: -x[1].recompute_flops)
        for i, o in rows:
            color = "green" if o.decision is Decision.SAVE else "yellow"
            t.add_row(
                str(i),
                o.op.removeprefix("aten.").removesuffix(".default"),
                o.module or ".",
                ", ".join("x".join(map(str, s)) for s in o.shape),
                format_bytes(o.nbytes),
                f"[{color}]{o.decision.value}[/{color}]",
                f"{o.recompute_ns / 1e3:.1f}" if o.recompute_ns else "",
                o.forced.value if o.forced else "",
            )
        out.append(t)
    return out


def diff_plans(a: Plan, b: Plan) -> dict[str, Any]:
    """What changed from plan ``a`` to plan ``b``: header numbers, regions (model order), op decisions."""
    sa, sb = plan_summary(a), plan_summary(b)
    header = {k: [sa[k], sb[k]] for k in sa if k not in ("checkpointed_regions", "rematerialized") and sa[k] != sb[k]}
    ra, rb = {r.path: r for r in a.regions}, {r.path: r for r in b.regions}
    ops = []
    for path in sorted(set(ra) & set(rb), key=path_order):
        for i, (x, y) in enumerate(zip(ra[path].ops, rb[path].ops)):
            if x.decision is not y.decision or x.op != y.op:
                ops.append(
                    {
                        "region": path,
                        "index": i,
                        "op": y.op,
                        "module": y.module,
                        "from": x.decision.value,
                        "to": y.decision.value,
                        "bytes": y.nbytes,
                    }
                )
    return {
        "same_model": a.fingerprint == b.fingerprint,
        "header": header,
        "regions_added": sorted(set(rb) - set(ra), key=path_order),
        "regions_removed": sorted(set(ra) - set(rb), key=path_order),
        "ops_changed": ops,
    }


# plan_summary's keys as a user names them, and how their values read
_HEADER_NAMES = {
    "budget_bytes": "budget",
    "budget": "budget as given",
    "no_checkpointing_peak_bytes": "peak, no checkpointing",
    "full_checkpointing_peak_bytes": "peak, full checkpointing",
    "predicted_peak_bytes": "peak, this plan",
    "forward_flops": "forward FLOPs",
    "extra_forward_flops": "extra forward FLOPs",
    "extra_forward_percent": "extra forward FLOPs %",
    "estimated_recompute_ns": "est. recompute",
    "solve_time_s": "solve time",
    "gap": "proven gap",
}


def _header_value(key: str, value: Any) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return str(value)
    if key.endswith("bytes"):
        return format_bytes(int(value))
    if key.endswith("flops"):
        return format_flops(int(value))
    if key.endswith("_ns"):
        return format_ns(int(value))
    if key.endswith("percent"):
        return f"{value:.1f}%"
    if key in ("gap", "reserve"):
        return f"{100 * value:.2f}%"
    return f"{value:.1f} s" if key.endswith("_s") else str(value)


def diff_table(d: dict[str, Any], *, ops: bool = False) -> Table:
    """``diff_plans`` for humans: header changes by name, regions folded; op changes counted, or listed
    with ``ops``."""
    t = Table(title="plan diff", title_justify="left")
    t.add_column("what", overflow="fold", max_width=24)
    t.add_column("A", overflow="fold")
    t.add_column("B", overflow="fold")
    if not d["same_model"]:
        t.add_row("[red]fingerprint[/red]", "differs", "plans are for different models or inputs")
    for k, (x, y) in d["header"].items():
        t.add_row(_HEADER_NAMES.get(k, k.replace("_", " ")), _header_value(k, x), _header_value(k, y))

    def folded(paths: list[str]) -> str:
        return ", ".join(f"{label} ({len(m)})" if len(m) > 1 else label for label, m in fold_names(paths))

    if d["regions_added"]:
        t.add_row("regions only in B", "", folded(d["regions_added"]))
    if d["regions_removed"]:
        t.add_row("regions only in A", folded(d["regions_removed"]), "")
    if d["ops_changed"] and not ops:
        t.add_row("op decisions changed", "", f"{len(d['ops_changed'])} (--ops lists them)")
    for o in d["ops_changed"] if ops else ():
        t.add_row(f"{o['region']} #{o['index']} {o['op'].removeprefix('aten.')} {o['module']}", o["from"], o["to"])
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
    t = Table(
        title="predicted, per budget: ckptplan and the cheapest fitting knob of each policy", title_justify="left"
    )
    for name, justify in [
        ("budget", "left"),
        ("policy", "left"),
        ("peak", "right"),
        ("+FLOPs", "right"),
        ("est. recompute", "right"),
        ("note", "left"),
    ]:
        t.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]  # str, not a Literal
    last = None
    for r in rows:
        if last is not None and r.budget != last:
            t.add_section()
        first = r.budget != last
        last = r.budget
        label = f"{r.budget} = {format_bytes(r.budget_bytes)}" if first else ""
        name = (f"[bold]{r.policy}[/bold]" if r.policy == "ckptplan" else r.policy) + (f" {r.knob}" if r.knob else "")
        if not r.fits:
            t.add_row(label, name, "[red]does not fit[/red]", "", "", r.note)
            continue
        t.add_row(
            label,
            name,
            format_bytes(r.peak_bytes),
            f"{100 * r.extra_forward_flops / forward_flops:.1f}%" if forward_flops else "",
            format_ns(r.extra_cost_ns),
            r.note,
        )
    return t


def sweep_answer(rows: list, *, forward_flops: int) -> list[str]:
    """One line per budget: ckptplan's peak and costs, and how it compares with the cheapest other policy
    that fits (estimated recompute time, what ckptplan minimises by default)."""
    out = []
    for budget in dict.fromkeys(r.budget for r in rows):
        mine = next((r for r in rows if r.budget == budget and r.policy == "ckptplan"), None)
        others = [r for r in rows if r.budget == budget and r.policy != "ckptplan" and r.fits]
        if mine is None:
            continue
        head = f"{budget} = {format_bytes(mine.budget_bytes)}: "
        if not mine.fits:
            out.append(head + f"nothing fits ({mine.note})" if mine.note else head + "nothing fits")
            continue
        line = (
            head
            + f"ckptplan peak {format_bytes(mine.peak_bytes)}, est. recompute {format_ns(mine.extra_cost_ns)}"
            + (f", +{100 * mine.extra_forward_flops / forward_flops:.1f}% FLOPs" if forward_flops else "")
        )
        if others:
            best = min(others, key=lambda r: r.extra_cost_ns)
            line += (
                f"; cheapest other policy: {best.policy}{' ' + best.knob if best.knob else ''}, "
                f"{format_ns(best.extra_cost_ns)}"
            )
        else:
            line += "; no other policy fits"
        out.append(line)
    return out


def cuda_memory_note(graph: Graph, plan: Plan) -> str:
    """What a cuda plan's peak covers, and estimates of what it does not."""
    from .target import CUDA_CONTEXT_BYTES, reserved_estimate

    timeline = graph.memory_timeline()
    at = max(range(len(timeline)), key=timeline.__getitem__) if timeline else 0
    live = [s.nbytes for s in graph.storages if max(s.alloc_event, 0) <= at < s.free_event]
    slack = max(0, reserved_estimate(live) - sum(live))  # segment rounding at the unplanned peak
    gpu = f" on {plan.gpu}" if plan.gpu else ""
    return (
        f"CUDA{gpu}: the peak is what torch.cuda.max_memory_allocated() reports (blocks rounded to 512 B, "
        f"cuBLAS workspace {format_bytes(graph.extra_fixed_bytes)} included); max_memory_reserved() about "
        f"{format_bytes(plan.predicted_peak_bytes + slack)} or more (allocator segments, estimate); the CUDA "
        f"context, about {format_bytes(CUDA_CONTEXT_BYTES)}, is counted by neither."
    )


def fit_summary(result: Any) -> dict[str, Any]:
    """A ``fit.FitResult`` as JSON: the largest value that fits, then every value tried, by value."""
    return {
        "argument": result.argument,
        "budget_bytes": result.budget_bytes,
        "best": result.best.value,
        "at_limit": result.at_limit,
        "trials": [
            {
                "value": t.value,
                "no_checkpointing_peak_bytes": t.no_checkpointing_peak_bytes,
                "minimum_bytes": t.minimum_bytes,
                "minimum_proven": t.minimum_proven,
                "fits": t.fits,
                "estimated_recompute_ns": t.plan.extra_cost_ns if t.plan else None,
                "estimated_step_time_percent": round(100 * t.step_time_fraction, 3) if t.plan else None,
                "extra_forward_percent": round(100 * t.plan.extra_forward_fraction, 3) if t.plan else None,
            }
            for t in result.by_value()
        ],
    }


def fit_table(result: Any) -> Table:
    """The values a ``fit`` search tried, by value, the answer's row in bold: the no-checkpointing peak, the
    lowest budget a plan fits ("<=": not proven minimal), and the cost of the cheapest plan under the budget."""
    t = Table(
        title=f"values of {result.argument} tried, budget {format_bytes(result.budget_bytes)}", title_justify="left"
    )
    for name, justify in [
        (result.argument, "right"),
        ("unplanned peak", "right"),
        ("minimum budget", "right"),
        ("fits", "left"),
        ("est. step time", "right"),
        ("forward FLOPs", "right"),
    ]:
        t.add_column(name, justify=justify)  # type: ignore[arg-type]  # str, not rich's JustifyMethod literal
    for trial in result.by_value():
        minimum = (
            "none found"
            if trial.minimum_bytes is None
            else (
                format_bytes(trial.minimum_bytes) if trial.minimum_proven else f"<= {format_bytes(trial.minimum_bytes)}"
            )
        )
        plan = trial.plan
        t.add_row(
            str(trial.value),
            format_bytes(trial.no_checkpointing_peak_bytes),
            minimum,
            "[green]yes[/green]" if plan else "[red]no[/red]",
            f"+{100 * trial.step_time_fraction:.1f}%" if plan else "",
            f"+{100 * plan.extra_forward_fraction:.1f}%" if plan else "",
            style="bold" if trial is result.best else None,
        )
    return t


def explain_tables(
    graph: Graph, without: Any, planned: Any = None, *, plan: Plan | None = None, depth: int | None = None
) -> list[Any]:
    """``explain.explain``'s breakdowns: the answer in one line, then bytes by kind, activations by module
    (identical layers folded) and the largest tensors alive at the peak, without and with the plan."""
    from .explain import Kind, module_rows

    shown = [without] + ([planned] if planned is not None else [])
    heads = ["no checkpointing"] + (["this plan"] if planned is not None else [])
    if planned is not None and plan is not None:
        acts = [dict(b.by_kind)[Kind.ACTIVATIONS] for b in shown]
        lead = (
            f"peak {format_bytes(planned.peak_bytes)} with the plan (budget {format_bytes(plan.budget_bytes)}), "
            f"{format_bytes(without.peak_bytes)} without: {format_bytes(acts[0] - acts[1])} fewer activations "
            f"alive at the peak"
        )
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
