"""Reprice measured policy runs under the present cost model: does a changed model order them better?

A change to the cost model changes ckptplan's plans, so judging it by a new pair of policy runs (about
40-60 minutes on 2 cores) also measures other plans. This instead keeps what was measured and asks the new
model to price it, run by hand (seconds to a few minutes), with the changed code: every configuration
priced again, the pairs counted as rank_agreement.py does:

    python benchmarks/calibration/reprice.py price RUN.json RUN2.json --out reprice.md

run.py records each plan's decisions. For runs made before it did, first dump them with the code that
made the runs: each ckptplan plan of the runs solved again (solves are deterministic: the costs must
equal the recorded predictions), then pass the dump:

    python benchmarks/calibration/reprice.py dump benchmarks/results/policies/results.json --out plans.json
    python benchmarks/calibration/reprice.py price RUN.json RUN2.json --plans plans.json --out reprice.md

Anchors are priced by the simulator as run.py prices them; ckptplan's plans by simulating their recorded (or dumped)
decisions. A dump whose solve does not reproduce the recorded prediction is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from itertools import combinations
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, run.py, policies.py

import ckptplan
from ckptplan import shapes
from ckptplan.solver.regions import candidate_regions
from ckptplan.solver.simulate import simulate

from rank_agreement import distinct_pairs, distinct_sign, settled_pairs
from run import predicted_cost, saved_ops, saved_positions, step_ratio, timed_configs, zoo


def _traced(name: str):
    torch.manual_seed(0)
    model, args, kwargs = zoo()[name]()
    return ckptplan.trace(model, *args, **kwargs)


def dump(run: dict) -> dict[str, dict]:
    """Each ckptplan plan of ``run``, solved again: key ``model|budget index|policy`` -> decisions (region
    path -> positions of the ops it saves in the region), its cost and the recorded one."""
    out = {}
    for res in run["results"]:
        graph = _traced(res["model"])
        for i, b in enumerate(res["budgets"]):
            for row in b["rows"]:
                if not row["policy"].startswith("ckptplan") or "error" in row:
                    continue
                objective = "time" if row["policy"] == "ckptplan" else row["policy"].removeprefix("ckptplan-")
                plan = ckptplan.solve(graph, b["budget_bytes"], time_limit_s=30, objective=objective, gap=0.0)
                if plan.extra_cost_ns != row["predicted_cost_ns"]:
                    raise SystemExit(
                        f"{res['model']} budget {i} {row['policy']}: the solve costs "
                        f"{plan.extra_cost_ns} ns, the run recorded {row['predicted_cost_ns']}: dump "
                        "with the code that made it"
                    )
                out[f"{res['model']}|{i}|{row['policy']}"] = {
                    "saved": saved_positions(plan),
                    "cost_ns": plan.extra_cost_ns,
                }
                print(f"[{res['model']}] budget {i} {row['policy']}: {plan.extra_cost_ns / 1e6:.2f} ms", flush=True)
    return out


def price(plans: dict[str, dict] | None, runs: list[dict]) -> list[dict]:
    """Per model, the configurations every run measured, priced by the present model, and the pairs."""
    out = []
    for results in zip(*(r["results"] for r in runs)):
        name = results[0]["model"]
        graph = _traced(name)
        candidates = {r.path: r for r in shapes.candidates(graph)}
        regions = candidate_regions(graph)
        configs = [timed_configs(res) for res in results]
        keys = sorted(set.intersection(*(set(c) for c in configs)), key=str)
        now = []
        for k in keys:
            if k[0] == "plan":
                saved = saved_ops(candidates, decisions(plans, name, k, configs[0][k]))
                now.append(simulate(graph, tuple(candidates.values()), saved).extra_cost_ns)
            else:
                now.append(predicted_cost(graph, regions, configs[0][k]))
        was = [configs[0][k]["predicted_cost_ns"] for k in keys]
        measured = [[step_ratio(c[k]) for k in keys] for c in configs]
        rows = [[c[k] for k in keys] for c in configs]
        entry = {"model": name, "configs": len(keys)}
        for label, predicted in (("recorded", was), ("present", now)):
            d, s = distinct_pairs(predicted, rows), settled_pairs(predicted, measured)
            entry[label] = {**d, "settled_pairs": s["settled_pairs"], "predicted_agrees": s["predicted_agrees"]}
        entry["misses"] = misses(keys, now, rows)
        out.append(entry)
    return out


def decisions(plans: dict[str, dict] | None, name: str, key: tuple, row: dict) -> dict[str, list[int]]:
    """A measured plan's decisions: recorded in the run (run.py records them since they were added), else
    from a dump of its plans."""
    if "saved" in row:
        return row["saved"]
    if plans is None:
        raise SystemExit(
            f"{name} budget {key[1]} {key[2]}: the run records no decisions (made before run.py "
            "recorded them): dump its plans with the code that made it and pass the dump"
        )
    return plans[f"{name}|{key[1]}|{key[2]}"]["saved"]


def misses(keys: list[tuple], predicted: list[int], rows: list[list[dict]]) -> list[str]:
    """The distinct pairs (rank_agreement.distinct_pairs) the prediction orders the other way."""
    out = []
    for i, j in combinations(range(len(keys)), 2):
        sign = distinct_sign(rows, i, j)
        if sign and ((predicted[i] > predicted[j]) - (predicted[i] < predicted[j])) != sign:
            out.append(
                " against ".join(
                    f"{'/'.join(map(str, keys[x]))} (predicted {predicted[x] / 1e6:.1f} ms, "
                    f"measured {_ms(run[x] for run in rows)} ms)"
                    for x in (i, j)
                )
            )
    return out


def _ms(rows) -> str:
    return ", ".join(f"{row['extra_step_s'] * 1e3:.1f}" for row in rows)


def markdown(rows: list[dict], command: str) -> str:
    lines = [
        "# Measured runs, priced again\n",
        f"`{command}`\n",
        "Distinct pairs: more than 2 standard errors apart, the same way, in every run; settled: every "
        "run orders them alike. 'recorded': the runs' own predictions; 'present': the present cost "
        "model's, of the same measured configurations.\n",
        "| model | configs | distinct: recorded agrees | distinct: present agrees | settled: recorded agrees "
        "| settled: present agrees |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        a, b = r["recorded"], r["present"]
        lines.append(
            f"| {r['model']} | {r['configs']} | {a['predicted_agrees_distinct']} of {a['distinct_pairs']} | "
            f"{b['predicted_agrees_distinct']} of {b['distinct_pairs']} | {a['predicted_agrees']} of "
            f"{a['settled_pairs']} | {b['predicted_agrees']} of {b['settled_pairs']} |"
        )
    lines.append("\nDistinct pairs the present model misorders:\n")
    lines += [f"- {r['model']}: {m}" for r in rows for m in r["misses"]] or ["- none"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="step", required=True)
    d = sub.add_parser("dump", help="solve a run's ckptplan plans again with this code; write their decisions")
    d.add_argument("run")
    d.add_argument("--out", required=True)
    p = sub.add_parser("price", help="price measured runs' configurations with this code")
    p.add_argument("runs", nargs="+", help="results.json of runs of the same code")
    p.add_argument("--plans", help="the dump of the runs' plans, for runs that record no decisions")
    p.add_argument("--out", required=True, help="Markdown file to write (a .json beside it)")
    a = ap.parse_args()
    command = "python benchmarks/calibration/reprice.py " + " ".join(sys.argv[1:])
    if a.step == "dump":
        plans = dump(json.loads(Path(a.run).read_text()))
        Path(a.out).write_text(json.dumps({"command": command, "plans": plans}, indent=1) + "\n")
        return
    plans = json.loads(Path(a.plans).read_text())["plans"] if a.plans else None
    rows = price(plans, [json.loads(Path(r).read_text()) for r in a.runs])
    out = Path(a.out)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=1) + "\n")
    text = markdown(rows, command)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
