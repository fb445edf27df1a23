"""Op rates: each forward op with FLOPs of the zoo, timed in its forward pass, against the cost model.

Run by hand (under a minute on 2 cores, nothing else running):
    python benchmarks/calibration/op_rates.py --passes 45 --out benchmarks/results/op_rates

costmodel.CPU prices an op with FLOPs at its class's rate (a roofline: its FLOPs at ``flops_per_s``, or
its traffic at ``bytes_per_s`` if slower), a class average from real steps, unless it has a line of its
own (``costmodel.OpRate``). This lists the ops, so that one priced far from its class shows, and fits
the line of each op in ``LINED`` (convolutions: on the CPU their time is mostly a fixed part and their
traffic, and the class's rate charged the zoo's thin ones a twentieth of it and less): each op timed in
the model's forward pass as runtime_overhead.py times it (``_OpTimer``: the kernel and the dispatch,
median of ``--passes``), glibc's trimming off as the other benchmarks run (common.py's
steady_allocator): without it a 2 MB output page-faults in again and a thin convolution reads twice as
slow). Identical ops of a model (same name, output, FLOPs and traffic: a repeated layer) are folded into
one row. Columns: the forward time, its FLOP and byte rates, the estimate (``OpNode.cost_ns``: what a
rerun is charged, its forward rate over the rerun factor the fit found) and forward time / estimate.
Matmuls read alike (the class's ratio); a row far from them is an op the class misprices. Attention is
left out (its FLOPs are not counted on CPU).
``--reprice JSON`` times nothing: it prices an earlier run's rows again under the present cost model.
Writes op_rates.json and op_rates.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, run.py, policies.py

import ckptplan
from ckptplan import costmodel

from common import describe, load_again, steady_allocator
from run import zoo
from runtime_overhead import forward_op_ns

ROOT = Path(__file__).resolve().parents[2]


def one_model(name: str, passes: int) -> dict:
    """The rows of one zoo model: its forward ops with FLOPs, identical ones folded."""
    torch.manual_seed(0)
    model, args, kwargs = zoo()[name]()
    graph = ckptplan.trace(model, *args, **kwargs)
    ns = forward_op_ns(model, args, kwargs, graph, passes)
    if ns is None:
        return {"model": name, "skipped": "the timed pass ran other ops than the trace"}
    groups: dict[tuple, list[float]] = {}
    for op, t in zip(graph.ops, ns):
        if op.flops:
            key = (op.name, tuple(o.shape for o in op.outputs), op.flops, op.bytes_moved, op.cost_ns)
            groups.setdefault(key, []).append(t)
    rows = []
    for (op, shapes, flops, moved, est), times in groups.items():
        t = statistics.median(times)
        rows.append(
            {
                "op": op,
                "output": [list(s) for s in shapes],
                "count": len(times),
                "flops": flops,
                "bytes_moved": moved,
                "forward_ns": round(t),
                "gflop_per_s": round(flops / t, 1),
                "gb_per_s": round(moved / t, 2),
                "estimate_ns": est,
                "forward_over_estimate": round(t / est, 2),
            }
        )
    return {"model": name, "rows": rows}


def reprice(results: list[dict]) -> None:
    """Give every row the estimate the present costmodel.CPU charges its rerun, its timing untouched (rows
    of a run made with other constants)."""
    for res in results:
        for r in res.get("rows", []):
            est = costmodel.CPU.cost_ns(
                flops=r["flops"], bytes_moved=r["bytes_moved"], is_view=False, op=r["op"].split(".")[1]
            )
            r.update(estimate_ns=est, forward_over_estimate=round(r["forward_ns"] / est, 2))


def summary(results: list[dict]) -> list[dict]:
    """Per aten op over every model: its rows' forward / estimate, median and range."""
    by_op: dict[str, list[float]] = {}
    for res in results:
        for r in res.get("rows", []):
            by_op.setdefault(r["op"], []).extend([r["forward_over_estimate"]] * r["count"])
    return [
        {"op": op, "ops": len(v), "median": round(statistics.median(v), 2), "min": min(v), "max": max(v)}
        for op, v in sorted(by_op.items())
    ]


LINED = ("aten.convolution.default",)  # ops costmodel.CPU prices by a line of their own (costmodel.OpRate)


def own_lines(results: list[dict]) -> list[dict]:
    """Per op of LINED: the line through its forward times over every model, fixed + FLOPs / a rate +
    bytes moved / a rate (least squares, each row weighted by its count), and the range of forward time
    over the line's value. costmodel.CPU's OpRate is this line times the rerun factor region_costs.py
    reads (its ``conv_rerun_scale``)."""
    out = []
    for op in LINED:
        rows = [r for res in results for r in res.get("rows", []) if r["op"] == op]
        if len(rows) < 3:
            continue
        x = numpy.array([[1.0, r["flops"], r["bytes_moved"]] for r in rows])
        t = numpy.array([float(r["forward_ns"]) for r in rows])
        w = numpy.sqrt(numpy.array([float(r["count"]) for r in rows]))
        (fixed, per_flop, per_byte), *_ = numpy.linalg.lstsq(x * w[:, None], t * w, rcond=None)
        ratio = t / (x @ numpy.array([fixed, per_flop, per_byte]))
        out.append(
            {
                "op": op,
                "rows": len(rows),
                "fixed_ns": round(float(fixed)),
                "gflop_per_s": round(1 / float(per_flop), 1) if per_flop > 0 else None,
                "gb_per_s": round(1 / float(per_byte), 2) if per_byte > 0 else None,
                "forward_over_line_min": round(float(ratio.min()), 2),
                "forward_over_line_max": round(float(ratio.max()), 2),
            }
        )
    return out


def markdown(result: dict) -> str:
    lines = [
        "# Op rates\n",
        f"`{result['command']}` on {result['machine']}.\n",
        "Each forward op with FLOPs timed in its forward pass (median of the passes), against its "
        "estimate (what costmodel.CPU charges its rerun: its class's rate, or its own line). Forward / "
        "estimate alike for all: the cost model prices them right relative to each other.\n",
        "## Per aten op\n",
        "| op | ops | forward / estimate: median | min | max |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {s['op']} | {s['ops']} | {s['median']} | {s['min']} | {s['max']} |" for s in result["summary"]]
    lines += [
        "\n## Lines of their own\n",
        "Forward time = fixed + FLOPs / rate + bytes moved / rate, fitted over every model's rows of the op "
        "(costmodel.OpRate; the CPU profile scales it by the rerun factor region_costs.py reads).\n",
        "| op | rows | fixed (us) | GFLOP/s | GB/s | forward / line: min | max |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {ln['op']} | {ln['rows']} | {ln['fixed_ns'] / 1e3:.0f} | {ln['gflop_per_s']} | {ln['gb_per_s']} | "
        f"{ln['forward_over_line_min']} | {ln['forward_over_line_max']} |"
        for ln in result.get("lines", [])
    ]
    for res in result["results"]:
        lines += [f"\n## {res['model']}\n"]
        if "skipped" in res:
            lines.append(f"skipped: {res['skipped']}")
            continue
        lines += [
            "| op | output | count | MFLOP | MB moved | forward (us) | GFLOP/s | GB/s | estimate (us) "
            "| forward / estimate |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in res["rows"]:
            out = ", ".join("x".join(map(str, s)) for s in r["output"])
            lines.append(
                f"| {r['op']} | {out} | {r['count']} | {r['flops'] / 1e6:.1f} | {r['bytes_moved'] / 1e6:.2f} "
                f"| {r['forward_ns'] / 1e3:.0f} | {r['gflop_per_s']} | {r['gb_per_s']} | "
                f"{r['estimate_ns'] / 1e3:.0f} | {r['forward_over_estimate']} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "op_rates"))
    ap.add_argument("--models", default=",".join(zoo()), help="comma-separated subset of the zoo")
    ap.add_argument("--passes", type=int, default=15, help="timed forward passes (median), after one warm-up")
    ap.add_argument(
        "--reprice",
        metavar="JSON",
        help="time nothing: price the rows of this op_rates.json again under the present cost model",
    )
    a = ap.parse_args()
    command = "python benchmarks/calibration/op_rates.py " + " ".join(sys.argv[1:])
    if a.reprice:
        run = load_again(a.reprice, "--reprice", "op_rates.py", "price", reprice)
        results, machine = run["results"], run.get("machine", "")
        command = f"{run.get('command', '').split(', priced again by ')[0]}, priced again by {command}"
    else:
        allocator = steady_allocator()
        results = [one_model(n, a.passes) for n in a.models.split(",")]
        machine = describe(allocator)
    result = {
        "command": command,
        "machine": machine,
        "summary": summary(results),
        "lines": own_lines(results),
        "results": results,
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "op_rates.json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    (out / "op_rates.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
