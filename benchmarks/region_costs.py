"""Region costs: what checkpointing decisions add to a real step, against the cost model's estimate.

Run by hand (about 15 minutes on 2 cores, nothing else running):
    python benchmarks/region_costs.py --out benchmarks/results/region_costs

The policy benchmark compares whole plans, whose differences mix many decisions. Here decisions are
applied to a copy of each zoo model, alone and in small random sets: every candidate of a sample
(``--per-model``, spread over the forward) checkpointed saving nothing, checkpointed saving every op it
may save (selective checkpointing's dispatch modes, little rerun), or rematerialized; then ``--mixes``
random compatible sets of 2 to 8 of those. A row's cost is the step time it adds, the plain model
timed just before and after each step (``--pairs`` times, median of the differences), so that drift of
the machine cancels. Beside it, the cost model's estimate as the simulator charges it: the ops rerun
(``OpDecision.recompute_ns``, by class of op) and the rest (checkpoint calls, hooks, dispatch modes,
recipes).

The calibration (``calibrate``) fits, over every row of every model, a scale for each part of the
estimate and the constants the estimate lacks: per checkpointed region, per rematerialization, per plan.
Those are the figures ``costmodel.CPU`` takes; they are measured where they are paid, between the real
model's kernels, where the runtime's Python runs with cold caches and reruns read inputs saved long
before (the tight loops of runtime_overhead.py read several times less). Writes region_costs.json and
region_costs.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from allocator import steady_allocator  # noqa: E402
from run import Bench, zoo  # noqa: E402
from runtime_overhead import plan_for  # noqa: E402

import ckptplan  # noqa: E402
from ckptplan import costmodel, planner  # noqa: E402
from ckptplan.solver.simulate import simulate  # noqa: E402

CLASSES = ("flops", "memory", "slow")  # ops with FLOPs, other memory-bound ops, costmodel.SLOW_OPS


def kinds(region) -> list[tuple[str, frozenset[int]]]:
    """The decisions measured on a candidate: (kind, ops it saves)."""
    if region.remat:
        return [("remat", frozenset())]
    out = [("checkpoint", frozenset())]
    if region.choices:
        out.append(("save-all", frozenset(region.choices)))
    return out


def sample(regions: tuple, per_model: int) -> list:
    """Up to ``per_model`` candidates spread evenly over the forward, rematerializations and module calls
    alike (the first and last included)."""
    if len(regions) <= per_model:
        return list(regions)
    step = (len(regions) - 1) / (per_model - 1)
    return [regions[round(i * step)] for i in range(per_model)]


def _step_s(bench: Bench) -> float:
    """One training step of the bench's model from its state and seed, in seconds."""
    return bench.one_step(bench.model)


class Paired:
    """Step times of a configured copy of the model against the model itself, step by step."""

    def __init__(self, name: str, model, args: tuple, kwargs: dict) -> None:
        self.plain = Bench(name, model, args, kwargs, 1)

    def plain_s(self, steps: int) -> float:
        """Median plain step, after a warm-up."""
        _step_s(self.plain)
        return statistics.median(_step_s(self.plain) for _ in range(steps))

    def extra_s(self, plan: ckptplan.Plan, pairs: int) -> tuple[float, float]:
        """(median, standard error of the mean) of the step time the plan adds, in seconds."""
        plain = self.plain
        twin = copy.deepcopy(plain.model)
        bench = Bench(plain.name, twin, plain.args, plain.kwargs, 1)
        with ckptplan.apply(twin, plan):
            _step_s(bench)  # the first step checks the plan's ops
            diffs = []
            before = _step_s(plain)
            for _ in range(pairs):
                with_plan = _step_s(bench)
                after = _step_s(plain)
                diffs.append(with_plan - (before + after) / 2)
                before = after
        return statistics.median(diffs), statistics.pstdev(diffs) / len(diffs) ** 0.5


def rerun_by_class(plan: ckptplan.Plan) -> dict[str, int]:
    """The estimated time of the ops a plan reruns, by the cost model's class of op."""
    out = dict.fromkeys(CLASSES, 0)
    for r in plan.regions:
        for o in r.ops:
            if o.recompute_ns:
                out["slow" if costmodel.is_slow(o.op) else "flops" if o.recompute_flops else "memory"] += o.recompute_ns
    return out


def compatible(graph, regions: tuple, chosen: list[tuple[Any, frozenset[int]]]) -> bool:
    """Whether these decisions can stand in one plan: no shared ops, no shared target, no nesting."""
    seen: set[int] = set()
    for r, _ in chosen:
        if seen & set(r.ops):
            return False
        seen |= set(r.ops)
    targets = [r.target for r, _ in chosen if r.remat]
    if len(targets) != len(set(targets)):
        return False
    try:
        simulate(graph, regions, {r.path: saved for r, saved in chosen})
    except ValueError:
        return False
    return True


def one_model(name: str, factory, per_model: int, mixes: int, pairs: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model, args, kwargs = factory()
    graph = ckptplan.trace(model, *args, **kwargs)
    regions = planner.candidates(graph)
    paired = Paired(name, model, args, kwargs)
    plain_s = paired.plain_s(9)
    empty, se = paired.extra_s(plan_for(graph, {}), pairs)  # the runtime's hooks, and a copy of the model
    pool = [(region, kind, saved) for region in sample(regions, per_model) for kind, saved in kinds(region)]
    sets = [[d] for d in pool]
    rng = random.Random(f"{name}-mixes")  # the same sets every run
    while len(sets) < len(pool) + mixes:
        chosen = rng.sample(pool, rng.randint(2, min(8, len(pool))))
        if compatible(graph, regions, [(r, saved) for r, _, saved in chosen]):
            sets.append(sorted(chosen, key=lambda d: d[0].first_op))
    rows = []
    for decisions in sets:
        plan = plan_for(graph, {r.path: saved for r, _, saved in decisions})
        rerun = rerun_by_class(plan)
        median, se = paired.extra_s(plan, pairs)
        label = " + ".join(f"{r.path} {kind}" for r, kind, _ in decisions)
        rows.append({"decisions": label, "kind": decisions[0][1] if len(decisions) == 1 else "mix",
                     "checkpoints": sum(k == "checkpoint" for _, k, _ in decisions),
                     "selective": sum(k == "save-all" for _, k, _ in decisions),
                     "remats": sum(k == "remat" for _, k, _ in decisions),
                     "ops": sum(len(r.ops) for r, _, _ in decisions),
                     "rerun_ops": sum(o.recompute_ns > 0 for r in plan.regions for o in r.ops),
                     **{f"predicted_rerun_{c}_ns": v for c, v in rerun.items()},
                     "predicted_rerun_ns": sum(rerun.values()),
                     "predicted_overhead_ns": plan.extra_cost_ns - sum(rerun.values()),
                     "predicted_ns": plan.extra_cost_ns, "measured_ns": round(median * 1e9),
                     "measured_se_ns": round(se * 1e9)})
        print(f"[{name}] {label}: predicted {plan.extra_cost_ns / 1e6:.2f} ms "
              f"(rerun {sum(rerun.values()) / 1e6:.2f}), measured {median * 1e3:.2f} +- {se * 1e3:.2f} ms", flush=True)
    splits = []
    for parent, children in split_candidates(regions):
        whole = plan_for(graph, {parent.path: frozenset()})
        parts = plan_for(graph, {c.path: frozenset() for c in children})
        (mw, sw), (mp, sp) = paired.extra_s(whole, 2 * pairs), paired.extra_s(parts, 2 * pairs)
        rerun_gap = sum(rerun_by_class(parts).values()) - sum(rerun_by_class(whole).values())
        call = ((mp - mw) * 1e9 - rerun_gap) / (len(children) - 1)  # what one more call costs
        splits.append({"parent": parent.path, "children": len(children), "whole_ns": round(mw * 1e9),
                       "parts_ns": round(mp * 1e9), "se_ns": round(1e9 * (sw * sw + sp * sp) ** 0.5),
                       "predicted_rerun_gap_ns": rerun_gap, "call_ns": round(call)})
        print(f"[{name}] {parent.path} whole {mw * 1e3:.2f} ms, its {len(children)} children one by one "
              f"{mp * 1e3:.2f} ms: {call / 1e6:.3f} ms a call", flush=True)
    return {"model": name, "plain_step_s": plain_s, "empty_plan_ns": round(empty * 1e9),
            "empty_plan_se_ns": round(se * 1e9), "candidates": len(regions), "rows": rows, "splits": splits,
            "summary": summarise(rows)}


def split_candidates(regions: tuple, limit: int = 3) -> list[tuple[Any, list]]:
    """Module calls checkpointed whole against their children checkpointed one by one (much the same ops
    rerun, more calls): the ones with the most children that are candidates, at most ``limit``."""
    calls = [r for r in regions if not r.remat and not r.members]
    out = []
    for r in calls:
        children = [c for c in calls if c.path.startswith(r.path + ".") and "." not in c.path[len(r.path) + 1:]]
        if len(children) >= 2:
            out.append((r, children))
    return sorted(out, key=lambda rc: (-len(rc[1]), rc[0].first_op))[:limit]


def summarise(rows: list[dict]) -> dict[str, dict[str, Any]]:
    """Per kind of row (one decision of a kind, or a mix): measured over predicted, of the sums and the
    median of single rows."""
    out = {}
    for kind in sorted({r["kind"] for r in rows}):
        rs = [r for r in rows if r["kind"] == kind]
        pred, meas = sum(r["predicted_ns"] for r in rs), sum(r["measured_ns"] for r in rs)
        ratios = [r["measured_ns"] / r["predicted_ns"] for r in rs if r["predicted_ns"] > 0]
        out[kind] = {"n": len(rs), "measured_over_predicted": round(meas / pred, 3) if pred else None,
                     "median_single_ratio": round(statistics.median(ratios), 3) if ratios else None}
    return out


TERMS = ("rerun_flops", "rerun_memory", "rerun_slow", "overhead", "per_plan")


def calibrate(results: list[dict]) -> dict[str, Any]:
    """The cost of one checkpoint call, from the splits (median over every model); then, that cost
    charged, weighted least squares over every row of every model (weights: 1 / the measurement's
    standard error): measured = a scale times each estimated part (the reruns by class, the runtime's
    other modelled overheads) plus what any plan at all adds (ns). A fit of the calls together with the
    rest cannot tell a call from a plan: most rows are one decision. Scales of 1, a per-plan constant of
    0 and ``call_ns`` = costmodel.CPU.checkpoint_call_ns: the model is right."""
    calls = [s["call_ns"] for res in results for s in res["splits"]]
    call = statistics.median(calls) if calls else float(costmodel.CPU.checkpoint_call_ns)
    rows = [r for res in results for r in res["rows"]]
    decisions = numpy.array([float(r["checkpoints"] + r["selective"] + r["remats"]) for r in rows])
    modelled_calls = decisions * costmodel.CPU.checkpoint_call_ns
    x = numpy.array([[r["predicted_rerun_flops_ns"], r["predicted_rerun_memory_ns"], r["predicted_rerun_slow_ns"],
                      r["predicted_overhead_ns"] - m, 1.0] for r, m in zip(rows, modelled_calls)])
    y = numpy.array([float(r["measured_ns"]) for r in rows]) - decisions * call
    w = 1 / numpy.maximum(numpy.array([float(r["measured_se_ns"]) for r in rows]), 1e5)
    coef, *_ = numpy.linalg.lstsq(x * w[:, None], y * w, rcond=None)
    as_is = y + decisions * call - numpy.array([float(r["predicted_ns"]) for r in rows])
    fitted = y - x @ coef
    return {"rows": len(rows), "splits": len(calls), "call_ns": round(call),
            **{t: round(float(c), 3) if t != "per_plan" else round(float(c)) for t, c in zip(TERMS, coef)},
            "rms_error_ms_as_is": round(float(numpy.sqrt(numpy.mean(as_is ** 2))) / 1e6, 3),
            "rms_error_ms_fitted": round(float(numpy.sqrt(numpy.mean(fitted ** 2))) / 1e6, 3)}


def _term(fitted: dict[str, Any], t: str) -> str:
    return str(fitted[t]) if t != "per_plan" else f"{_ms(fitted[t])} ms"


def markdown(results: list[dict], fitted: dict[str, Any], command: str, machine: str) -> str:
    lines = [f"# Region costs\n\n`{command}` on {machine}. Decisions applied to a copy of the model, alone and "
             "in random mixes; measured: the step time they add (the plain model timed just before and after "
             "each step, median of the differences, +- the standard error of their mean); predicted: the "
             "simulator's recompute time, split into the ops rerun and the rest.\n",
             "## Calibration (every row of every model)\n",
             "One checkpoint call (a region or a recipe): the median over the splits below. Then, that charged, "
             "weighted least squares: measured = a scale x each estimated part + what any plan adds. Right: "
             f"scales 1, a call of {_ms(costmodel.CPU.checkpoint_call_ns)} ms (costmodel.CPU), no per-plan "
             "constant.\n",
             "| rows | splits | call | " + " | ".join(TERMS) + " | rms error as is (ms) | rms error fitted (ms) |",
             "|---" * (len(TERMS) + 5) + "|",
             f"| {fitted['rows']} | {fitted['splits']} | {_ms(fitted['call_ns'])} ms | "
             + " | ".join(_term(fitted, t) for t in TERMS)
             + f" | {fitted['rms_error_ms_as_is']} | {fitted['rms_error_ms_fitted']} |",
             "\n## Per model\n",
             "| model | plain step (ms) | empty plan (ms) | kind | rows | measured / predicted (sums) "
             "| median row ratio |", "|---|---|---|---|---|---|---|"]
    for res in results:
        for kind, s in res["summary"].items():
            lines.append(f"| {res['model']} | {res['plain_step_s'] * 1e3:.1f} | {_ms(res['empty_plan_ns'])} | "
                         f"{kind} | {s['n']} | {s['measured_over_predicted']} | {s['median_single_ratio']} |")
    lines += ["\n## Splits: a module call checkpointed whole, against its children one by one\n",
              "| model | module | children | whole (ms) | one by one (ms) | +- (ms) | rerun gap predicted (ms) "
              "| one call (ms) |", "|---|---|---|---|---|---|---|---|"]
    for res in results:
        for sp in res["splits"]:
            lines.append(f"| {res['model']} | {sp['parent']} | {sp['children']} | {_ms(sp['whole_ns'])} | "
                         f"{_ms(sp['parts_ns'])} | {_ms(sp['se_ns'])} | {_ms(sp['predicted_rerun_gap_ns'])} | "
                         f"{_ms(sp['call_ns'])} |")
    for res in results:
        lines += [f"\n## {res['model']}\n", "| decisions | ops (rerun) | predicted rerun (ms) "
                  "| predicted other (ms) | measured (ms) |", "|---|---|---|---|---|"]
        for r in res["rows"]:
            lines.append(f"| {r['decisions']} | {r['ops']} ({r['rerun_ops']}) | "
                         f"{r['predicted_rerun_ns'] / 1e6:.3f} | {r['predicted_overhead_ns'] / 1e6:.3f} | "
                         f"{r['measured_ns'] / 1e6:.3f} +- {r['measured_se_ns'] / 1e6:.3f} |")
    return "\n".join(lines) + "\n"


def _ms(ns: float | None) -> str:
    return "" if ns is None else f"{ns / 1e6:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default=",".join(zoo()))
    ap.add_argument("--per-model", type=int, default=16, help="candidates measured per model")
    ap.add_argument("--mixes", type=int, default=16, help="random sets of 2-8 of those decisions per model")
    ap.add_argument("--pairs", type=int, default=30, help="steps with the candidate, each between two plain ones")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch's intra-op threads")
    a = ap.parse_args()
    allocator = steady_allocator()
    torch.set_num_threads(a.threads)
    models = zoo()
    started = time.perf_counter()
    results = [one_model(n, models[n], a.per_model, a.mixes, a.pairs) for n in a.models.split(",")]
    command = "python benchmarks/region_costs.py " + " ".join(sys.argv[1:])
    machine = (f"{platform.machine()}, {torch.get_num_threads()} threads, Python {platform.python_version()}, "
               f"torch {torch.__version__}, {allocator}")
    fitted = calibrate(results)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "region_costs.json").write_text(json.dumps(
        {"command": command, "machine": machine, "elapsed_s": round(time.perf_counter() - started),
         "calibration": fitted, "results": results}, indent=1) + "\n")
    text = markdown(results, fitted, command, machine)
    (out / "region_costs.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
