"""Scale: trace and solve 7B-class shapes on this CPU, without allocating their memory.

Run by hand (about 4 minutes on 2 cores):
    pip install -c constraints.txt -e ".[bench]"
    python benchmarks/scale.py --out benchmarks/results/scale

Each measurement runs in a fresh process so its peak RSS is its own. Budgets are halfway between full
checkpointing and none, plus a budget sweep on the 32-layer 7B shape. Writes scale.json (with the command
and the machine) and scale_depth.png (depth sweep: trace time, solve time, CP-SAT variables, gap).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import describe

ROOT = Path(__file__).resolve().parent.parent


def one(model: str, n_layer: int, time_limit: float, check_memory: bool, at: float = 0.5) -> dict:
    """Trace and solve one shape under FakeTensorMode (CPU kernels' shapes, no real memory), at a budget
    ``at`` of the way from full checkpointing to none."""
    sys.path.insert(0, str(ROOT / "examples"))
    from torch._subclasses.fake_tensor import FakeTensorMode

    import ckptplan
    from ckptplan.measure import measure_peak

    import gpt2
    import llama

    factory = {"llama7b": llama.llama_7b, "gpt2xl": gpt2.gpt2_xl}[model]
    from ckptplan.solver.regions import candidate_regions, outermost
    from ckptplan.solver.simulate import simulate

    row: dict = {"model": model, "n_layer": n_layer, "budget_at": at}
    with FakeTensorMode():
        m, args = factory(device="cpu", n_layer=n_layer)
        t = time.monotonic()
        graph = ckptplan.trace(m, *args)
        row.update(
            trace_s=round(time.monotonic() - t, 2),
            forward_ops=graph.num_forward,
            events=graph.num_events,
            baseline_peak_bytes=graph.baseline_peak_bytes,
        )
        row["rss_after_trace_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        regions = candidate_regions(graph)
        full = simulate(graph, regions, {r.path: frozenset() for r in outermost(regions)}).peak_bytes
        budget = full + int(at * (graph.baseline_peak_bytes - full))
        t = time.monotonic()
        plan = ckptplan.solve(graph, budget, time_limit_s=time_limit)
        row.update(
            solve_s=round(time.monotonic() - t, 2),
            status=plan.status,
            gap=plan.gap,
            variables=plan.solver_stats.get("variables"),
            constraints=plan.solver_stats.get("constraints"),
            cp_sat_search=plan.solver_stats.get("cp_sat_search"),
            estimated_recompute_ns=plan.extra_cost_ns,
            budget_bytes=plan.budget_bytes,
            predicted_peak_bytes=plan.predicted_peak_bytes,
            full_peak_bytes=plan.full_peak_bytes,
            extra_forward_percent=round(100 * plan.extra_forward_fraction, 2),
        )
        if check_memory:
            with ckptplan.apply(m, plan):
                measured = measure_peak(m, *args)
            row.update(
                memtracker_fake_peak_bytes=measured,
                measured_over_predicted=round(measured / plan.predicted_peak_bytes, 4),
            )
    row["rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale"))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot from OUT/scale.json")
    a = ap.parse_args()
    if a.one:
        model, n, limit, check, at = a.one.split(",")
        print(json.dumps(one(model, int(n), float(limit), check == "1", float(at))))
        return
    out = Path(a.out)
    if a.plot_only:
        plot(json.loads((out / "scale.json").read_text())["rows"], out / "scale_depth.png")
        return
    out.mkdir(parents=True, exist_ok=True)
    # the solve limit is 50 s so that trace + solve stays under a minute; the depth sweep reaches 128
    # layers (about 24,000 forward and backward ops)
    runs = [("llama7b", 32, 50, 1, 0.5), ("gpt2xl", 48, 50, 0, 0.5)]
    runs += [("llama7b", n, 50, 0, 0.5) for n in (4, 8, 16, 64, 128)]
    runs += [("gpt2xl", n, 50, 0, 0.5) for n in (12, 24)]  # shallow GPT-2-XL: the largest integrality gaps
    # the budget sweep on the 7B shape, near full checkpointing included (two memory rows bind there)
    runs += [("llama7b", 32, 50, 0, at) for at in (0.05, 0.25, 0.75, 0.95)]
    rows = []
    for model, n, limit, check, at in runs:
        res = subprocess.run(
            [sys.executable, __file__, "--one", f"{model},{n},{limit},{check},{at}"],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    result = {
        "command": "python benchmarks/scale.py --out benchmarks/results/scale",
        "machine": describe(),
        "note": "each row in a fresh process; times are wall clock; FakeTensorMode with CPU kernels' shapes",
        "rows": rows,
    }
    (out / "scale.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, out / "scale_depth.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for model, label in (("llama7b", "Llama-7B shape, seq 4096"), ("gpt2xl", "GPT-2-XL shape, seq 1024")):
        depth = sorted(
            (r for r in rows if r["model"] == model and r.get("budget_at", 0.5) == 0.5), key=lambda r: r["n_layer"]
        )
        x = [r["n_layer"] for r in depth]
        axes[0].plot(x, [r["solve_s"] for r in depth], "s-", label=f"solve, {label}")
        axes[0].plot(x, [r["trace_s"] for r in depth], "o--", label=f"trace, {label}")
        axes[1].plot(x, [r["variables"] for r in depth], "o-", label=f"variables, {label}")
        axes[2].plot(x, [100 * r["gap"] for r in depth], "o-", label=label)
    axes[0].set(xlabel="layers", ylabel="seconds", title="time (solve limit 50 s), log-log")
    axes[1].set(xlabel="layers", title="CP-SAT model size")
    axes[2].set(xlabel="layers", ylabel="%", title="proven gap (stops at 0.5%)")
    axes[0].set_xscale("log", base=2)
    axes[0].set_yscale("log")  # log-log: a slope of 1 is linear growth
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
