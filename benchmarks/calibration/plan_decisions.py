"""Plan decisions: what each decision of a ckptplan plan adds to a real step, alone and together.

Run by hand (1-2 minutes a model on 2 cores, nothing else running):
    python benchmarks/calibration/plan_decisions.py --models unet,resnet --budgets 0.65 \
        --out benchmarks/results/plan_decisions

region_costs.py calibrates the cost model on candidates drawn at random; the solver then picks the
decisions it prices cheapest, and where the calibration sampled few of their kind (rematerializations
whose recipes rerun a convolution) the picked ones are the ones it misprices most. Here, for each model
and budget (a fraction of the no-checkpointing peak), the plan of the time objective (or of
``--objective flops``) is applied whole and then one decision at a time, each step timed between two
plain steps as region_costs.py times them (the median of ``--pairs`` differences, +- the standard error
of their mean), beside the simulator's estimate of the same decisions. A decision alone also pays the
costs rematerializations share (the saved-tensor hook), so the singles add up to more than the whole
plan. Writes plan_decisions.json and plan_decisions.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, run.py, policies.py

import ckptplan
from ckptplan.decisions import plan_decisions
from ckptplan.plan import Decision
from ckptplan.solver.simulate import simulate

from common import describe, steady_allocator
from region_costs import Paired, rerun_by_class
from run import zoo


def bench(name: str, fraction: float, pairs: int, objective: str = "time") -> dict:
    torch.manual_seed(0)
    model, args, kwargs = zoo()[name]()
    graph = ckptplan.trace(model, *args, **kwargs)
    paired = Paired(name, model, args, kwargs)  # region_costs.py's timing: a plan's copy between plain steps
    budget = round(fraction * graph.baseline_peak_bytes)
    plan = ckptplan.solve(graph, budget, time_limit_s=30, gap=0.0, objective=objective)
    regions, saved = plan_decisions(graph, plan)
    measured, se = paired.extra_s(plan, pairs)
    rows = []
    for r in plan.regions:
        alone = replace(plan, regions=(r,))
        s, s_se = paired.extra_s(alone, pairs)
        rows.append(
            {
                "decision": r.path,
                "kind": "rematerialize" if r.remat else "checkpoint",
                "saved_ops": sum(o.decision is Decision.SAVE for o in r.ops),
                "rerun_flops": r.extra_forward_flops,
                "rerun_ns": sum(rerun_by_class(alone).values()),
                "predicted_ns": simulate(graph, regions, {r.path: saved[r.path]}).extra_cost_ns,
                "measured_ms": round(s * 1e3, 3),
                "measured_se_ms": round(s_se * 1e3, 3),
            }
        )
        print(f"[{name}] {rows[-1]}", flush=True)
    return {
        "model": name,
        "budget_bytes": budget,
        "budget_fraction": fraction,
        "objective": objective,
        "status": plan.status,
        "predicted_ns": plan.extra_cost_ns,
        "measured_ms": round(measured * 1e3, 3),
        "measured_se_ms": round(se * 1e3, 3),
        "decisions": rows,
    }


def markdown(results: list[dict], command: str, machine: str) -> str:
    lines = [
        f"# Plan decisions\n\n`{command}` on {machine}. What the plan adds to a step, "
        "whole and one decision at a time (median of steps timed between plain ones, ± the standard "
        "error of their mean), against the simulator's estimate; a decision alone also pays the costs that "
        "rematerializations share.\n"
    ]
    for res in results:
        objective = res.get("objective", "time")
        lines.append(
            f"## {res['model']} at {res['budget_fraction']:.0%} ({res['budget_bytes']} B), {objective} objective\n"
        )
        lines.append(
            f"whole plan ({len(res['decisions'])} decisions, {res['status']}): estimated "
            f"{res['predicted_ns'] / 1e6:.2f} ms, measured {res['measured_ms']:.2f} ± "
            f"{res['measured_se_ms']:.2f} ms\n"
        )
        lines.append(
            "| decision | kind | saved ops | rerun MFLOP | reruns estimated (ms) | estimated alone (ms) "
            "| measured alone (ms) | measured / estimated |"
        )
        lines.append("|---|---|---|---|---|---|---|---|")
        for d in res["decisions"]:
            est = d["predicted_ns"] / 1e6
            measured = f"{d['measured_ms']:.2f} ± {d['measured_se_ms']:.2f}"
            lines.append(
                f"| `{d['decision']}` | {d['kind']} | {d['saved_ops']} | {d['rerun_flops'] / 1e6:.1f} | "
                f"{d['rerun_ns'] / 1e6:.2f} | {est:.2f} | {measured} | {d['measured_ms'] / est:.2f} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default="unet,resnet", help="comma-separated subset of run.py's zoo")
    ap.add_argument("--budgets", default="0.65", help="comma-separated fractions of the no-checkpointing peak")
    ap.add_argument("--pairs", type=int, default=30, help="steps with the plan, each between two plain ones")
    ap.add_argument("--objective", default="time", choices=("time", "flops"), help="what the solver minimises")
    a = ap.parse_args()
    allocator = steady_allocator()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    results = [
        bench(name, float(f), a.pairs, a.objective) for name in a.models.split(",") for f in a.budgets.split(",")
    ]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/calibration/plan_decisions.py " + " ".join(sys.argv[1:])
    machine = describe(allocator)
    (out / "plan_decisions.json").write_text(
        json.dumps({"command": command, "machine": machine, "results": results}, indent=1) + "\n"
    )
    (out / "plan_decisions.md").write_text(markdown(results, command, machine))
    print(f"wrote {out}/plan_decisions.json, plan_decisions.md")


if __name__ == "__main__":
    main()
