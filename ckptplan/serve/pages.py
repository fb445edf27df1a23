"""The review pages, rendered on the server: plain HTML, every value escaped, no script.

``index``: the stored answers, newest first, with a form to diff two plans; ``plan_page``: one plan's
header and its decisions with identical layers folded into one group, as ``ckptplan show`` prints them;
``diff_page``: ``report.diff_plans`` of two plans.
"""

from __future__ import annotations

import datetime as dt
import json
from html import escape
from typing import AbstractSet, Any, Iterable

import yaml

from .. import report
from ..plan import Decision, Plan, fold_paths, fold_regions, plan_from_dict
from ..units import format_bytes, format_flops
from .store import Entry, Kind

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; }
th, td { border: 1px solid #ccc; padding: 0.2rem 0.5rem; font-size: 0.9rem; }
th { background: #f2f2f2; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.save { color: #1a7f37; } .recompute { color: #9a6700; }
.status-optimal, .status-feasible { color: #1a7f37; } .status-infeasible, .status-refused { color: #cf222e; }
summary { cursor: pointer; font-weight: 600; margin-top: 0.5rem; }
"""


def _page(title: str, body: str) -> str:
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f'<style>{_STYLE}</style></head>\n<body>\n<p><a href="/">ckptplan plans</a></p>\n{body}\n'
        "</body></html>\n"
    )


def _table(
    headers: Iterable[str], rows: Iterable[Iterable[str]], *, numeric: AbstractSet[int] = frozenset(), id_: str = ""
) -> str:
    """``rows`` hold HTML already escaped by the caller (cells may carry links)."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>"
        + "".join(f'<td class="n">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(r))
        + "</tr>\n"
        for r in rows
    )
    return f"<table{f' id={chr(34)}{id_}{chr(34)}' if id_ else ''}><tr>{head}</tr>\n{body}</table>"


def _when(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _opt(v: int | None, fmt: Any) -> str:
    return "" if v is None else escape(fmt(v))


def index(entries: list[Entry]) -> str:
    rows = []
    for e in entries:
        link = f'<a href="/plans/{escape(e.key)}">{escape(e.model)}</a>'
        rows.append(
            [
                link,
                escape(e.budget),
                _opt(e.predicted_peak_bytes, format_bytes),
                _opt(e.extra_forward_flops, format_flops),
                "" if e.extra_cost_ns is None else f"{e.extra_cost_ns / 1e6:.2f} ms",
                f'<span class="status-{escape(e.status.value)}">{escape(e.status.value)}</span>',
                escape(e.objective.value),
                escape(_when(e.created)),
            ]
        )
    table = (
        _table(
            ["model", "budget", "predicted peak", "extra FLOPs", "est. recompute time", "status", "objective", "when"],
            rows,
            numeric={2, 3, 4},
            id_="plans",
        )
        if rows
        else '<p id="empty">No plans yet.</p>'
    )
    options = "".join(
        f'<option value="{escape(e.key)}">{escape(e.model)} at {escape(e.budget)} ({escape(_when(e.created))})</option>'
        for e in entries
        if e.ok and e.kind is Kind.SOLVE
    )
    form = (
        '<h2>Compare two plans</h2><form action="/diff" method="get" id="diff-form">'
        f'<label>A <select name="a">{options}</select></label> '
        f'<label>B <select name="b">{options}</select></label> <button type="submit">diff</button></form>'
        if options
        else ""
    )
    return _page("ckptplan plans", f"<h1>Plans</h1>\n{table}\n{form}")


def load(entry: Entry) -> Plan:
    return plan_from_dict(yaml.safe_load(entry.body), source=f"stored plan {entry.key}")


def plan_page(entry: Entry) -> str:
    title = f"{entry.model} at {entry.budget}"
    if entry.kind is Kind.SWEEP and entry.ok:
        return sweep_page(entry)
    if not entry.ok:
        err = entry.error()
        return _page(
            title,
            f'<h1>{escape(title)}</h1><p class="status-{escape(entry.status.value)}" id="error">'
            f"{escape(entry.status.value)}: {escape(str(err.get('message', '')))}</p>",
        )
    plan = load(entry)
    s = report.plan_summary(plan)
    head = [
        ("model", plan.model),
        ("fingerprint", plan.fingerprint),
        ("inputs", ", ".join(plan.inputs)),
        (
            "budget",
            f"{plan.budget_text} = {format_bytes(plan.budget_bytes)}"
            + (f" ({plan.reserve:.0%} kept free)" if plan.reserve else ""),
        ),
        ("peak, no checkpointing", format_bytes(plan.baseline_peak_bytes)),
        ("peak, full checkpointing", format_bytes(plan.full_peak_bytes)),
        ("peak, this plan", format_bytes(plan.predicted_peak_bytes)),
        (
            "extra forward FLOPs",
            f"{format_flops(plan.extra_forward_flops)} "
            f"({s['extra_forward_percent']:.1f}% of {format_flops(plan.forward_flops)})",
        ),
        ("estimated recompute time", f"{plan.extra_cost_ns / 1e6:.2f} ms"),
        ("checkpointed regions", str(len(s["checkpointed_regions"]))),
        ("rematerialized tensors", str(len(s["rematerialized"]))),
        (
            "solver",
            f"{plan.status.value} (minimising {plan.objective.value}), gap {100 * plan.gap:.2f}%, "
            f"{entry.solve_seconds:.1f} s",
        ),
        ("stored", _when(entry.created)),
        ("key", entry.key),
    ]
    summary = _table(["what", "value"], [[escape(k), escape(v)] for k, v in head], id_="summary")
    groups = []
    for paths, r in fold_regions(plan.regions):
        label = f"{fold_paths(paths)} ({r.type_name} x{len(paths)})"
        rows = [
            [
                str(i),
                escape(o.op.removeprefix("aten.")),
                escape(o.module or "."),
                escape(", ".join("x".join(map(str, sh)) for sh in o.shape)),
                escape(o.dtype),
                escape(format_bytes(o.nbytes)),
                f'<span class="{o.decision.value}">{escape(o.decision.value)}</span>',
                escape(format_flops(o.recompute_flops)) if o.recompute_flops else "",
                f"{o.recompute_ns / 1e3:.1f}" if o.recompute_ns else "",
                escape(o.forced.value if o.forced else ""),
            ]
            for i, o in enumerate(r.ops)
        ]
        saved = sum(o.decision is Decision.SAVE for o in r.ops)
        groups.append(
            f'<details class="group" open><summary>{escape(label)}: {saved} of {len(r.ops)} ops saved'
            f"</summary>"
            + _table(
                [
                    "#",
                    "op",
                    "module",
                    "shape",
                    "dtype",
                    "bytes",
                    "decision",
                    "recompute FLOPs",
                    "recompute µs",
                    "forced by",
                ],
                rows,
                numeric={0, 5, 7, 8},
            )
            + "</details>"
        )
    decisions = "\n".join(groups) or "<p>No region is checkpointed: the step fits without.</p>"
    return _page(
        title,
        f'<h1>{escape(title)}</h1>\n{summary}\n<p><a href="/plans/{escape(entry.key)}/yaml">'
        f"plan file (YAML)</a></p>\n<h2>Decisions (identical layers folded)</h2>\n{decisions}",
    )


def diff_page(a: Entry, b: Entry) -> str:
    d = report.diff_plans(load(a), load(b))
    rows = []
    if not d["same_model"]:
        rows.append(["fingerprint", "differs", "plans are for different models or inputs"])
    for k, (x, y) in d["header"].items():
        fmt = format_bytes if k.endswith("bytes") else format_flops if k.endswith("flops") else str
        rows.append([k, fmt(x) if isinstance(x, int) else str(x), fmt(y) if isinstance(y, int) else str(y)])
    if d["regions_added"]:
        rows.append(["checkpointed only in B", "", fold_paths(d["regions_added"])])
    if d["regions_removed"]:
        rows.append(["checkpointed only in A", fold_paths(d["regions_removed"]), ""])
    for o in d["ops_changed"]:
        rows.append([f"{o['region']} #{o['index']} {o['op'].removeprefix('aten.')} {o['module']}", o["from"], o["to"]])
    names = f"A: {a.model} at {a.budget}, B: {b.model} at {b.budget}"
    table = (
        _table(["what", "A", "B"], [[escape(c) for c in r] for r in rows], id_="diff")
        if rows
        else '<p id="same">The two plans are the same.</p>'
    )
    links = f'<p><a href="/plans/{escape(a.key)}">plan A</a> · <a href="/plans/{escape(b.key)}">plan B</a></p>'
    return _page("ckptplan diff", f"<h1>Diff</h1><p>{escape(names)}</p>\n{links}\n{table}")


_COLORS = ("#0969da", "#cf222e", "#1a7f37", "#9a6700", "#8250df", "#bf3989", "#57606a")


def sweep_page(entry: Entry) -> str:
    """A sweep's rows, as ``ckptplan sweep`` prints them, and its Pareto plot (inline SVG)."""
    data = json.loads(entry.body)
    rows, fwd = data["rows"], data["forward_flops"]
    cells = []
    for r in rows:
        fits = r["fits"]
        cells.append(
            [
                escape(f"{r['budget']} = {format_bytes(r['budget_bytes'])}"),
                escape(r["policy"]),
                escape(r["knob"]),
                escape(format_bytes(r["peak_bytes"])) if fits else "does not fit",
                escape(format_flops(r["extra_forward_flops"])) if fits else "",
                f"{100 * r['extra_forward_flops'] / fwd:.1f}" if fits and fwd else "",
                f"{r['extra_cost_ns'] / 1e6:.2f}" if fits else "",
                escape(r["note"]),
            ]
        )
    table = _table(
        ["budget", "policy", "knob", "peak", "extra forward FLOPs", "% of forward", "est. recompute ms", "note"],
        cells,
        numeric={3, 4, 5, 6},
        id_="sweep",
    )
    title = f"{entry.model}: sweep at {entry.budget}"
    return _page(
        title,
        f"<h1>{escape(title)}</h1>\n<h2>Pareto plot (predicted)</h2>\n{pareto_svg(rows, fwd)}\n<h2>Rows</h2>\n{table}",
    )


def pareto_svg(rows: list[dict[str, Any]], forward_flops: int) -> str:
    """Peak memory (x) against extra forward FLOPs in % of forward (y), one line per policy."""
    pts: dict[str, set[tuple[int, float]]] = {}
    for r in rows:
        if r["fits"] and r["peak_bytes"] is not None:
            extra = 100 * r["extra_forward_flops"] / max(forward_flops, 1)
            pts.setdefault(r["policy"], set()).add((r["peak_bytes"], extra))
    if not pts:
        return '<p id="pareto-empty">No policy fits any budget: nothing to plot.</p>'
    xs = [x for p in pts.values() for x, _ in p]
    ys = [y for p in pts.values() for _, y in p]
    x0, x1, y1 = min(xs), max(xs), max(ys) or 1.0
    x1 = x1 if x1 > x0 else x0 + 1
    W, H, L, B = 640, 360, 70, 40  # size, left and bottom margins

    def sx(x: float) -> float:
        return L + (x - x0) / (x1 - x0) * (W - L - 20)

    def sy(y: float) -> float:
        return H - B - y / y1 * (H - B - 20)

    out = [
        f'<svg id="pareto" xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
        f'viewBox="0 0 {W} {H}" role="img" aria-label="Pareto plot">',
        f'<line x1="{L}" y1="{H - B}" x2="{W - 10}" y2="{H - B}" stroke="#444"/>',
        f'<line x1="{L}" y1="10" x2="{L}" y2="{H - B}" stroke="#444"/>',
        f'<text x="{(W + L) / 2:.0f}" y="{H - 8}" text-anchor="middle" font-size="12">peak memory '
        f"({escape(format_bytes(x0))} to {escape(format_bytes(x1))})</text>",
        f'<text x="14" y="{(H - B) / 2:.0f}" font-size="12" transform="rotate(-90 14 {(H - B) / 2:.0f})" '
        f'text-anchor="middle">extra forward FLOPs, % (0 to {y1:.1f})</text>',
    ]
    for i, (policy, p) in enumerate(pts.items()):
        color = _COLORS[i % len(_COLORS)]
        line = sorted(p)
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in line)
        width = 2.5 if policy == "ckptplan" else 1.2
        out.append(
            f'<polyline class="policy" data-policy="{escape(policy)}" points="{path}" fill="none" '
            f'stroke="{color}" stroke-width="{width}"/>'
        )
        out += [
            f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5" fill="{color}"><title>{escape(policy)}: '
            f"{escape(format_bytes(x))}, +{y:.1f}%</title></circle>"
            for x, y in line
        ]
        out.append(f'<text x="{W - 150}" y="{24 + 16 * i}" font-size="12" fill="{color}">{escape(policy)}</text>')
    return "".join(out) + "</svg>"


def not_found(message: str) -> str:
    return _page("not found", f"<h1>Not found</h1><p>{escape(message)}</p>")
