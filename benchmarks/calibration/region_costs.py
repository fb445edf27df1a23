"""Region costs: what checkpointing decisions add to a real step, against the cost model's estimate.

Run by hand (about 15 minutes on 2 cores, nothing else running):
    python benchmarks/calibration/region_costs.py --out benchmarks/results/region_costs

The policy benchmark compares whole plans, whose differences mix many decisions. Here decisions are
applied to a copy of each zoo model, alone and in small random sets: every candidate of a sample
(``--per-model``, spread over the forward) checkpointed saving nothing, checkpointed saving every op it
may save (selective checkpointing's dispatch modes, little rerun), or rematerialized; then ``--mixes``
random compatible sets of 2 to 8 of those. A row's cost is the step time it adds, the plain model
timed just before and after each step (``--pairs`` times, median of the differences), so that drift of
the machine cancels. Beside it, the cost model's estimate as the simulator charges it: the ops rerun
(``OpDecision.recompute_ns``, by class of op) and the rest (checkpoint calls, hooks, dispatch modes,
recipes).

The calibration (``calibrate``): one checkpoint call from "splits" (a module call checkpointed whole
against its children one by one); then, over every row of every model, what the runtime adds beyond the
reruns and the hooks: per region selective checkpointing runs and per op under its modes, per
rematerialization and per op of its recipe, per op a recipe mode visits (each module call once), per
tensor the saved-tensor hook looks up (once, when any decision rematerializes), a scale on the reruns of
the ops priced at rates of their own (convolutions, BatchNorm), and what is left for every plan. Those are the
figures ``costmodel.CPU`` takes; they are measured where they are paid, between the real model's
kernels, where the runtime's Python runs with cold caches and reruns read inputs saved long before (the
tight loops of runtime_overhead.py read several times less). Writes region_costs.json and region_costs.md.

``--picked 0.8,0.65,0.5`` adds the decisions the solver picks: each decision of the time objective's plan
at those budgets alone, and the plan whole (``source: picked`` in the rows; a summary row per model).

``--refit JSON`` measures nothing: it counts an earlier run's rows again under the present cost model
(each model traced again; its predictions are then the present model's) and fits them again.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, run.py, policies.py

import ckptplan
from ckptplan import costmodel, shapes
from ckptplan.decisions import plan_decisions
from ckptplan.graph import Forced
from ckptplan.solver import remat
from ckptplan.solver.simulate import simulate

from common import describe, load_again, steady_allocator
from run import Bench, zoo
from runtime_overhead import plan_for

# ops with FLOPs, convolutions, other memory-bound ops, costmodel.SLOW_OPS, BatchNorm, random ops
CLASSES = ("flops", "conv", "memory", "slow", "batchnorm", "random")
COUNTS = ("rerun_ops", "calls", "hook_ops", "sac_calls", "sac_ops", "remats", "recipe_ops", "visit_ops", "packs")


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
                out[_class(o)] += o.recompute_ns
    return out


def _class(o) -> str:
    if o.forced == Forced.RANDOM.value:  # priced at random_bytes_per_s
        return "random"
    parts = o.op.split(".")
    name = parts[1] if len(parts) > 1 else o.op
    if name == "convolution":  # priced by its own line (costmodel.OpRate)
        return "conv"
    if name in costmodel.BATCH_NORMS:
        return "batchnorm"
    return "slow" if costmodel.is_slow(o.op) else "flops" if o.recompute_flops else "memory"


def counts(graph, plan: ckptplan.Plan, decisions: list[tuple[Any, str]]) -> dict[str, int]:
    """What the fit (``calibrate``) prices, for these (candidate, kind) decisions and their plan: the
    reruns by class of op without the fixed part of each op (costmodel.CPU's rates), the ops rerun,
    checkpoint calls, ops under a checkpoint's saved-tensor hooks, regions selective checkpointing runs
    (its modes set up), ops under those modes (forward and recomputation's walk), rematerializations and
    their recipes' ops, the forward ops their recipe modes visit (each module call once, however many
    recipes it holds) and the tensors the model's forward saves through the saved-tensor hook (once,
    when any decision rematerializes)."""
    out = {f"rerun_{c}_ns": 0 for c in CLASSES} | dict.fromkeys(COUNTS, 0)
    anchors: dict[str, int] = {}
    fixed = costmodel.CPU.op_overhead_ns
    for r in plan.regions:
        for o in r.ops:
            if o.recompute_ns:
                out[f"rerun_{_class(o)}_ns"] += max(0, o.recompute_ns - fixed)
                out["rerun_ops"] += 1
    for region, kind in decisions:
        out["hook_ops"] += region.end_op - region.first_op
        if kind == "remat":
            call = remat.anchor(graph, region.first_op, region.end_op)
            out["remats"] += 1
            out["recipe_ops"] += region.end_op - region.first_op
            anchors[call.path] = call.end_op - call.first_op
        else:
            out["calls"] += 1
        if kind == "save-all":
            out["sac_calls"] += 1
            out["sac_ops"] += (region.end_op - region.first_op) + (region.recompute_end - region.first_op)
    out["visit_ops"] = sum(anchors.values())
    out["packs"] = graph.saved_tensors if anchors else 0
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


def picked_sets(graph, regions: tuple, fractions: tuple[float, ...]) -> list[list[tuple[Any, str, frozenset[int]]]]:
    """The decisions the solver picks: for each budget (a fraction of the no-checkpointing peak), the time
    objective's plan, each decision alone and then the plan whole. The random sample holds few of some
    kinds the solver favours (rematerializations that rerun a convolution or a concatenation), and those
    are the ones a miscalibration hurts. Decisions that save only some of a region's ops are left out (a
    row records a region's kind, not its ops)."""
    by_path = {r.path: r for r in regions}
    out: list[list[tuple[Any, str, frozenset[int]]]] = []
    for fraction in fractions:
        plan = ckptplan.solve(graph, round(fraction * graph.baseline_peak_bytes), time_limit_s=30, gap=0.0)
        _, saved = plan_decisions(graph, plan)
        decisions = [
            (by_path[path], _kind(by_path[path], ops), ops)
            for path, ops in sorted(saved.items(), key=lambda kv: by_path[kv[0]].first_op)
        ]
        whole = [d for d in decisions if d[1] is not None]
        out += [[d] for d in whole if [d] not in out]
        if len(whole) == len(decisions) > 1:
            out.append(whole)
    return out


def _kind(region, ops: frozenset[int]) -> str | None:
    """A decision's kind as a row records it (``kinds``); None for a region saving only some of its ops."""
    if region.remat:
        return "remat"
    return "checkpoint" if not ops else "save-all" if ops == frozenset(region.choices) else None


def one_model(
    name: str, factory, per_model: int, mixes: int, pairs: int, picked: tuple[float, ...] = ()
) -> dict[str, Any]:
    torch.manual_seed(0)
    model, args, kwargs = factory()
    graph = ckptplan.trace(model, *args, **kwargs)
    regions = shapes.candidates(graph)
    paired = Paired(name, model, args, kwargs)
    plain_s = paired.plain_s(9)
    empty, empty_se = paired.extra_s(plan_for(graph, {}), pairs)  # the runtime's hooks, and a copy of the model
    pool = [(region, kind, saved) for region in sample(regions, per_model) for kind, saved in kinds(region)]
    sets = [[d] for d in pool]
    rng = random.Random(f"{name}-mixes")  # the same sets every run
    while len(sets) < len(pool) + mixes:
        chosen = rng.sample(pool, rng.randint(2, min(8, len(pool))))
        if compatible(graph, regions, [(r, saved) for r, _, saved in chosen]):
            sets.append(sorted(chosen, key=lambda d: d[0].first_op))
    sampled = len(sets)
    sets += [d for d in picked_sets(graph, regions, picked) if d not in sets]
    rows = []
    for index, decisions in enumerate(sets):
        plan = plan_for(graph, {r.path: saved for r, _, saved in decisions})
        predicted = prediction(graph, plan, [(r, kind) for r, kind, _ in decisions])
        median, se = paired.extra_s(plan, pairs)
        label = " + ".join(f"{r.path} {kind}" for r, kind, _ in decisions)
        rows.append(
            {
                "decisions": label,
                "kind": decisions[0][1] if len(decisions) == 1 else "mix",
                "source": "sample" if index < sampled else "picked",
                "checkpoints": sum(k == "checkpoint" for _, k, _ in decisions),
                "selective": sum(k == "save-all" for _, k, _ in decisions),
                "remats": sum(k == "remat" for _, k, _ in decisions),
                "ops": sum(len(r.ops) for r, _, _ in decisions),
                "rerun_ops": sum(o.recompute_ns > 0 for r in plan.regions for o in r.ops),
                **predicted,
                "measured_ns": round(median * 1e9),
                "measured_se_ns": round(se * 1e9),
            }
        )
        print(
            f"[{name}] {label}: predicted {plan.extra_cost_ns / 1e6:.2f} ms "
            f"(rerun {predicted['predicted_rerun_ns'] / 1e6:.2f}), measured {median * 1e3:.2f} +- {se * 1e3:.2f} ms",
            flush=True,
        )
    splits = []
    for parent, children in split_candidates(regions):
        whole = plan_for(graph, {parent.path: frozenset()})
        parts = plan_for(graph, {c.path: frozenset() for c in children})
        (mw, sw), (mp, sp) = paired.extra_s(whole, 2 * pairs), paired.extra_s(parts, 2 * pairs)
        split = split_call(whole, parts, len(children), mw, mp)
        splits.append(
            {
                "parent": parent.path,
                "children": len(children),
                "whole_ns": round(mw * 1e9),
                "parts_ns": round(mp * 1e9),
                "se_ns": round(1e9 * (sw * sw + sp * sp) ** 0.5),
                **split,
            }
        )
        print(
            f"[{name}] {parent.path} whole {mw * 1e3:.2f} ms, its {len(children)} children one by one "
            f"{mp * 1e3:.2f} ms: {split['call_ns'] / 1e6:.3f} ms a call",
            flush=True,
        )
    return {
        "model": name,
        "plain_step_s": plain_s,
        "empty_plan_ns": round(empty * 1e9),
        "empty_plan_se_ns": round(empty_se * 1e9),
        "candidates": len(regions),
        "rows": rows,
        "splits": splits,
        "summary": summarise(rows),
    }


def prediction(graph, plan: ckptplan.Plan, decisions: list[tuple[Any, str]]) -> dict[str, Any]:
    """A row's predictions: the simulator's recompute time for ``plan`` (these (candidate, kind)
    decisions), split into the ops rerun by class and the rest, and the row's ``counts``."""
    rerun = rerun_by_class(plan)
    return {
        **{f"predicted_rerun_{c}_ns": v for c, v in rerun.items()},
        "predicted_rerun_ns": sum(rerun.values()),
        "predicted_overhead_ns": plan.extra_cost_ns - sum(rerun.values()),
        "predicted_ns": plan.extra_cost_ns,
        "counts": counts(graph, plan, decisions),
    }


def split_call(
    whole: ckptplan.Plan, parts: ckptplan.Plan, children: int, whole_s: float, parts_s: float
) -> dict[str, int]:
    """What one more checkpoint call costs: a module call's ``children`` checkpointed one by one
    (``parts``, ``parts_s`` added to a step) against the call whole (``whole``, ``whole_s``), less the gap
    the cost model predicts in what they rerun."""
    rerun_gap = sum(rerun_by_class(parts).values()) - sum(rerun_by_class(whole).values())
    call = ((parts_s - whole_s) * 1e9 - rerun_gap) / (children - 1)
    return {"predicted_rerun_gap_ns": rerun_gap, "call_ns": round(call)}


def split_candidates(regions: tuple, limit: int = 3) -> list[tuple[Any, list]]:
    """Module calls checkpointed whole against their children checkpointed one by one (much the same ops
    rerun, more calls): the ones with the most children that are candidates, at most ``limit``."""
    calls = [r for r in regions if not r.remat and not r.members]
    out = []
    for r in calls:
        children = [c for c in calls if c.path.startswith(r.path + ".") and "." not in c.path[len(r.path) + 1 :]]
        if len(children) >= 2:
            out.append((r, children))
    return sorted(out, key=lambda rc: (-len(rc[1]), rc[0].first_op))[:limit]


def summarise(rows: list[dict]) -> dict[str, dict[str, Any]]:
    """Per kind of row (one decision of a kind, or a mix): measured over predicted, of the sums and the
    median of single rows."""
    out = {}
    groups = {kind: [r for r in rows if r["kind"] == kind] for kind in sorted({r["kind"] for r in rows})}
    if any(r.get("source") == "picked" for r in rows):  # the solver's own decisions, of every kind
        groups["picked by the solver"] = [r for r in rows if r.get("source") == "picked"]
    for kind, rs in groups.items():
        pred, meas = sum(r["predicted_ns"] for r in rs), sum(r["measured_ns"] for r in rs)
        ratios = [r["measured_ns"] / r["predicted_ns"] for r in rs if r["predicted_ns"] > 0]
        out[kind] = {
            "n": len(rs),
            "measured_over_predicted": round(meas / pred, 3) if pred else None,
            "median_single_ratio": round(statistics.median(ratios), 3) if ratios else None,
        }
    return out


# The fit's unknowns, in nanoseconds: per region selective checkpointing runs (its policy's contexts and
# dispatch modes set up), per op under its modes (forward, and again in the recomputation's walk), per
# rematerialization, per forward op a recipe mode visits and per tensor the forward saves through the
# saved-tensor hook; ``counts`` gives their columns. The rest is charged at costmodel.CPU's figures: the
# reruns at its rates, with their fixed part per op, and the ops under a checkpoint's hooks. A free fit of
# those too is not identifiable here: the ops rerun are nearly the ops under hooks, and memory-bound ops
# other than random ones cost little (free, it reads a scale of 11 on them against -15 us an op under hooks).
TERMS = ("sac_call_ns", "sac_op_ns", "remat_ns", "recipe_op_ns", "visit_ns", "pack_ns")
COLUMNS = ("sac_calls", "sac_ops", "remats", "recipe_ops", "visit_ops", "packs")
# Beside them, a scale on what costmodel.CPU charges the reruns of the ops it prices at their own rates
# apart from their class (convolutions, BatchNorm; 1 when they are right): a convolution's line comes
# from its forward passes (op_rates.py), and a rerun in backward costs some multiple of it.
SCALED = ("conv", "batchnorm")


def predicted_ns(c: dict[str, int], profile: costmodel.DeviceProfile = costmodel.CPU) -> int:
    """What the simulator charges for a row with these counts (``counts``), in ``profile``'s terms."""
    return (
        sum(c[f"rerun_{k}_ns"] for k in CLASSES)
        + c["rerun_ops"] * profile.op_overhead_ns
        + c["calls"] * profile.checkpoint_call_ns
        + c["hook_ops"] * profile.checkpoint_op_ns
        + c["sac_calls"] * profile.sac_call_ns
        + c["sac_ops"] * profile.sac_forward_ns
        + c["remats"] * profile.remat_ns
        + c["recipe_ops"] * profile.remat_op_ns
        + c["visit_ops"] * profile.remat_visit_ns
        + c["packs"] * profile.remat_pack_ns
    )


def calibrate(results: list[dict]) -> dict[str, Any]:
    """The cost of one checkpoint call, from the splits (median over every model); then, that cost and
    the parts ``TERMS`` leave out charged at costmodel.CPU's figures, weighted least squares over every
    row of every model (weights: 1 / the measurement's standard error) of what remains of the step time a
    row adds against its ``counts``, and against the reruns of the ops in ``SCALED`` as charged (their
    scales). A fit of the calls together with the rest cannot tell a call from a plan: most rows are one
    decision. ``left_per_plan_ns``, the weighted mean of what the fit leaves, is what every plan pays
    beyond it (the model charges nothing per plan). The model is right when the fit reads the
    nanoseconds costmodel.CPU holds and scales of 1."""
    cpu = costmodel.CPU
    calls = [s["call_ns"] for res in results for s in res["splits"]]
    call = statistics.median(calls) if calls else float(cpu.checkpoint_call_ns)
    rows = [r for res in results for r in res["rows"]]
    x = numpy.array(
        [[float(r["counts"][c]) for c in COLUMNS] + [float(r["counts"][f"rerun_{k}_ns"]) for k in SCALED] for r in rows]
    )
    measured = numpy.array([float(r["measured_ns"]) for r in rows])
    free = dataclasses.replace(
        cpu,
        checkpoint_call_ns=round(call),
        sac_call_ns=0,
        sac_forward_ns=0,
        sac_replay_ns=0,
        remat_call_ns=0,
        remat_op_ns=0,
        remat_visit_ns=0,
        remat_pack_ns=0,
    )
    y = (
        measured
        - numpy.array([float(predicted_ns(r["counts"], free)) for r in rows])
        + x[:, len(COLUMNS) :].sum(axis=1)
    )
    w = 1 / numpy.maximum(numpy.array([float(r["measured_se_ns"]) for r in rows]), 1e5)
    coef, *_ = numpy.linalg.lstsq(x * w[:, None], y * w, rcond=None)
    fit = dict(zip(TERMS, (float(c) for c in coef)))
    scales = {f"{k}_rerun_scale": round(float(c), 2) for k, c in zip(SCALED, coef[len(COLUMNS) :])}
    left = y - x @ coef
    per_plan = float(numpy.sum(left * w * w) / numpy.sum(w * w))
    as_is = measured - numpy.array([float(predicted_ns(r["counts"])) for r in rows])
    return {
        "rows": len(rows),
        "splits": len(calls),
        "call_ns": round(call),
        **{t: round(v) for t, v in fit.items()},
        **scales,
        "left_per_plan_ns": round(per_plan),
        "rms_error_ms_as_is": round(float(numpy.sqrt(numpy.mean(as_is**2))) / 1e6, 3),
        "rms_error_ms_fitted": round(float(numpy.sqrt(numpy.mean(left**2))) / 1e6, 3),
    }


def _term(fitted: dict[str, Any], t: str) -> str:
    return f"{fitted[t] / 1e3:.1f} us"


def recount(results: list[dict]) -> None:
    """Give every row the ``counts`` of its decisions under the present cost model (rows of a run made
    before they were recorded, or with other constants): each model traced again, its candidates found
    by path, the measurements untouched."""
    models = zoo()
    for res in results:
        torch.manual_seed(0)
        model, args, kwargs = models[res["model"]]()
        graph = ckptplan.trace(model, *args, **kwargs)
        by_path = {r.path: r for r in shapes.candidates(graph)}
        for row in res["rows"]:
            decisions = [(by_path[p], kind) for p, kind in (d.rsplit(" ", 1) for d in row["decisions"].split(" + "))]
            saved = {r.path: frozenset(r.choices) if kind == "save-all" else frozenset() for r, kind in decisions}
            row.update(prediction(graph, plan_for(graph, saved), decisions))
        res["summary"] = summarise(res["rows"])
        children = {p.path: c for p, c in split_candidates(tuple(by_path.values()))}
        for sp in res["splits"]:
            kids = children[sp["parent"]]
            whole = plan_for(graph, {sp["parent"]: frozenset()})
            parts = plan_for(graph, {c.path: frozenset() for c in kids})
            sp.update(split_call(whole, parts, len(kids), sp["whole_ns"] / 1e9, sp["parts_ns"] / 1e9))


def markdown(results: list[dict], fitted: dict[str, Any], command: str, machine: str) -> str:
    lines = [
        f"# Region costs\n\n`{command}` on {machine}. Decisions applied to a copy of the model, alone and "
        "in random mixes; measured: the step time they add (the plain model timed just before and after "
        "each step, median of the differences, +- the standard error of their mean); predicted: the "
        "simulator's recompute time, split into the ops rerun and the rest.\n",
        "## Calibration (every row of every model)\n",
        "One checkpoint call: the median over the splits below. Then, that and the reruns and hooks charged "
        "as costmodel.CPU does, weighted least squares of what remains against the regions selective "
        "checkpointing runs, the ops under its modes, the rematerializations and their recipes' ops, the ops "
        "their recipe modes visit, the tensors the saved-tensor hook looks up and the reruns of the ops "
        "priced at their own rates; what it leaves, on average, every plan pays. "
        "Right: the figures costmodel.CPU holds "
        f"({_ms(costmodel.CPU.checkpoint_call_ns)} ms a call, {_ms(costmodel.CPU.sac_call_ns)} ms a "
        f"selective region, {costmodel.CPU.sac_forward_ns / 1e3:.1f} us an op under its modes, "
        f"{_ms(costmodel.CPU.remat_ns)} ms a rematerialization, {_ms(costmodel.CPU.remat_op_ns)} ms an op "
        "of its recipe, "
        f"{costmodel.CPU.remat_visit_ns / 1e3:.1f} us a visit, {costmodel.CPU.remat_pack_ns / 1e3:.1f} us a "
        "tensor the hook looks up; scales 1 on the reruns of "
        + ", ".join(SCALED)
        + ", which costmodel.CPU prices at rates of their own).\n",
        "| rows | splits | call | "
        + " | ".join(TERMS)
        + " | "
        + " | ".join(f"{k} scale" for k in SCALED)
        + " | left per plan | rms error as is (ms) | rms error fitted (ms) |",
        "|---" * (len(TERMS) + len(SCALED) + 6) + "|",
        f"| {fitted['rows']} | {fitted['splits']} | {_ms(fitted['call_ns'])} ms | "
        + " | ".join(_term(fitted, t) for t in TERMS)
        + " | "
        + " | ".join(str(fitted.get(f"{k}_rerun_scale", "")) for k in SCALED)
        + f" | {_ms(fitted['left_per_plan_ns'])} ms | {fitted['rms_error_ms_as_is']} "
        + f"| {fitted['rms_error_ms_fitted']} |",
        "\n## Per model\n",
        "| model | plain step (ms) | empty plan (ms) | kind | rows | measured / predicted (sums) | median row ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for res in results:
        for kind, s in res["summary"].items():
            lines.append(
                f"| {res['model']} | {res['plain_step_s'] * 1e3:.1f} | {_ms(res['empty_plan_ns'])} | "
                f"{kind} | {s['n']} | {s['measured_over_predicted']} | {s['median_single_ratio']} |"
            )
    lines += [
        "\n## Splits: a module call checkpointed whole, against its children one by one\n",
        "| model | module | children | whole (ms) | one by one (ms) | +- (ms) | rerun gap predicted (ms) "
        "| one call (ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        for sp in res["splits"]:
            lines.append(
                f"| {res['model']} | {sp['parent']} | {sp['children']} | {_ms(sp['whole_ns'])} | "
                f"{_ms(sp['parts_ns'])} | {_ms(sp['se_ns'])} | {_ms(sp['predicted_rerun_gap_ns'])} | "
                f"{_ms(sp['call_ns'])} |"
            )
    for res in results:
        lines += [
            f"\n## {res['model']}\n",
            "| decisions | ops (rerun) | predicted rerun (ms) | predicted other (ms) | measured (ms) |",
            "|---|---|---|---|---|",
        ]
        for r in res["rows"]:
            lines.append(
                f"| {r['decisions']} | {r['ops']} ({r['rerun_ops']}) | "
                f"{r['predicted_rerun_ns'] / 1e6:.3f} | {r['predicted_overhead_ns'] / 1e6:.3f} | "
                f"{r['measured_ns'] / 1e6:.3f} +- {r['measured_se_ns'] / 1e6:.3f} |"
            )
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
    ap.add_argument(
        "--picked",
        default="",
        metavar="FRACTIONS",
        help="also every decision of the time objective's plan at these budgets (comma-separated "
        "fractions of the no-checkpointing peak), alone and whole",
    )
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch's intra-op threads")
    ap.add_argument(
        "--refit",
        metavar="JSON",
        help="measure nothing: count the rows of this region_costs.json "
        "again under the present cost model, and fit them again",
    )
    a = ap.parse_args()
    command = "python benchmarks/calibration/region_costs.py " + " ".join(sys.argv[1:])
    started = time.perf_counter()
    if a.refit:
        run = load_again(a.refit, "--refit", "region_costs.py", "count", recount)
        results, machine, elapsed = run["results"], run.get("machine", ""), run.get("elapsed_s")
        measured_by = run.get("measured_by", run.get("command", "").split(", counted and fitted again by ")[0])
        command = f"{measured_by}, counted and fitted again by {command}"
    else:
        allocator = steady_allocator()
        torch.set_num_threads(a.threads)
        models = zoo()
        picked = tuple(float(f) for f in a.picked.split(",") if f.strip())
        results = [one_model(n, models[n], a.per_model, a.mixes, a.pairs, picked) for n in a.models.split(",")]
        machine = describe(allocator)
        elapsed = round(time.perf_counter() - started)
        measured_by = command
    fitted = calibrate(results)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "region_costs.json").write_text(
        json.dumps(
            {
                "command": command,
                "measured_by": measured_by,
                "machine": machine,
                "elapsed_s": elapsed,
                "calibration": fitted,
                "results": results,
            },
            indent=1,
        )
        + "\n"
    )
    text = markdown(results, fitted, command, machine)
    (out / "region_costs.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
