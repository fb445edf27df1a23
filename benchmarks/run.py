"""Policy benchmark: ckptplan against the checkpointing policies people use, measured on real steps.

Run by hand (20-30 minutes on 2 cores, 3-10 minutes a model with --models):
    pip install -c constraints.txt -e ".[bench]"
    python benchmarks/run.py --out benchmarks/results/policies

For every model of the zoo and every budget of a sweep (the no-checkpointing peak down to ckptplan's
minimum, 6 points), each policy runs real CPU training steps and is measured in separate steps:

* peak: MemTracker over one step (never with FlopCounterMode on: it keeps recomputed tensors alive);
* extra forward FLOPs: FlopCounterMode over one whole step, minus the no-checkpointing step;
* step time: median of several steps, as a ratio to no checkpointing timed between them (the machine's
  speed drifts over minutes: a ratio to one baseline at the start moved by 70%). The steps are spread
  over rounds (``--rounds``): once every configuration is measured, each round applies each one afresh
  and times a few steps of it, each between two steps of an unmodified copy of the model, the order of
  configurations reversed every other round, so that a burst of noise or drift falls on all
  configurations rather than on whichever ran then. The compiled policy is timed at once (compiling it
  again each round would dominate the run). glibc keeps freed memory in the process
  (``allocator.py``): otherwise each step page-faults its activations in again, by a varying amount;
* setup time: planning (ckptplan's trace + solve), compiling or wrapping.

Policies whose result does not depend on the budget (none, full, every-k, sqrt(n), op-level SAC, the
compile memory budget) are measured once per knob; at each budget the knob with the fewest extra FLOPs
whose measured peak fits is reported ("best that fits"). ckptplan is solved at each budget, minimising
estimated time (``ckptplan``) and FLOPs (``ckptplan-flops``). A policy that cannot run says why.

Writes results.json (every measurement, the command and the machine), results.md (the headline table)
and pareto.png (measured peak against extra forward FLOPs, one panel per model).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # some VMs advertise AMX but trap it

import ckptplan
from ckptplan.measure import measure_flops, measure_peak
from ckptplan.plan import Decision
from ckptplan.solver import baselines
from ckptplan.solver.regions import candidate_regions

import policies
from common import describe, spearman, steady_allocator

ROOT = Path(__file__).resolve().parent.parent

POINTS = 6


def zoo() -> dict[str, Callable[[], tuple]]:
    """name -> factory of (model, args, kwargs). Five families, sizes that step in well under a second."""
    import gpt2
    import hf_models
    import llama
    import resnet
    import unet
    import vit

    def three(built: tuple) -> tuple:
        return built if len(built) == 3 else (*built, {})

    return {
        "gpt2": lambda: three(gpt2.gpt2_tiny(batch_size=8, seq_len=128)),  # dropout, SDPA, tied weights
        "hf_llama": lambda: three(hf_models.hf_llama_tiny(batch_size=4, seq_len=128)),  # transformers, GQA
        "llama": lambda: three(llama.llama_tiny(batch_size=8, seq_len=128)),  # RMSNorm, rotary, SwiGLU, GQA
        "vit": lambda: three(vit.vit_tiny(batch_size=16)),  # vision transformer
        "resnet": lambda: three(resnet.resnet_tiny(batch_size=32)),  # BatchNorm, skips, in-place ReLU
        "unet": lambda: three(unet.unet_tiny(batch_size=8, image_size=64)),  # branches: skip concatenations
    }


class Bench:
    """One model: runs steps from the same state and seed, measuring peak, FLOPs and time separately."""

    def __init__(self, name: str, model, args: tuple, kwargs: dict, steps: int) -> None:
        self.name, self.model, self.args, self.kwargs, self.steps = name, model, args, kwargs, steps
        self.state = {k: v.clone() for k, v in model.state_dict().items()}
        self.twin = copy.deepcopy(model)  # no checkpointing, timed step by step beside a configuration

    def reset(self, model=None) -> None:
        model = self.model if model is None else model
        model.load_state_dict(self.state)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1234)

    def measure(self, step_model, plain_s: float | None = None) -> dict[str, Any]:
        """Peak and FLOPs of ``step_model``, and its step time when ``plain_s`` is given: the
        no-checkpointing step time measured just before the policy was applied, so that slow drift of the
        machine cancels in the ratio. Without it the step is timed later, in rounds (``interleaved``)."""
        self.reset()
        peak = measure_peak(step_model, *self.args, **self.kwargs)
        self.reset()
        flops = measure_flops(step_model, *self.args, **self.kwargs)
        out: dict[str, Any] = {"peak_bytes": peak, "step_flops": flops}
        if plain_s is not None:
            out.update(step_s=self.step_time(step_model), plain_step_s=plain_s)
        return out

    def step_time(self, step_model) -> float:
        """Median time of ``steps`` training steps, after one warm-up step."""
        return statistics.median(self.step_times(step_model, self.steps))

    def step_times(self, step_model, steps: int) -> list[float]:
        """``steps`` training step times, after one warm-up step."""
        times = [self.one_step(step_model) for _ in range(steps + 1)]
        self.reset()
        return times[1:]

    def one_step(self, step_model, model=None) -> float:
        """One training step of ``step_model`` from the saved state and seed (loaded into ``model``, by
        default the bench's), in seconds."""
        self.reset(model)
        t = time.perf_counter()
        _loss(step_model(*self.args, **self.kwargs)).backward()
        return time.perf_counter() - t

    def interleaved(
        self, configs: list[tuple[dict, Callable[[], tuple[Any, Callable[[], None]]]]], rounds: int
    ) -> None:
        """Time each configuration in ``rounds`` rounds (the order reversed every other round, so that a
        steady drift of the machine's speed falls alike on all), applying it afresh each time: ``apply()``
        returns (step model, undo). After a warm-up step, its steps alternate one by one with steps of an
        unmodified copy of the model (``twin``), so that each configuration and no checkpointing see the
        same moments of the machine. Each row gets the median of its steps (``steps // rounds`` per round,
        at least 2) as ``step_s``, the median of the no-checkpointing steps between them as
        ``plain_step_s``, and what a step adds to the no-checkpointing steps either side of it: the median
        as ``extra_step_s``, its standard error as ``extra_step_se_s`` (a median's, for normal noise: 1.25
        times the mean's; rank_agreement.py's test of whether two configurations differ)."""
        per_round = max(2, self.steps // rounds)
        plain: list[list[float]] = [[] for _ in configs]
        times: list[list[float]] = [[] for _ in configs]
        diffs: list[list[float]] = [[] for _ in configs]  # each step less the plain steps either side of it
        for k in range(rounds):
            order = list(range(len(configs)))
            for i in order if k % 2 == 0 else order[::-1]:
                step_model, undo = configs[i][1]()
                try:
                    self.one_step(step_model)  # warm-up: ckptplan's first step checks the plan's ops
                    before = self.one_step(self.twin, self.twin)
                    plain[i].append(before)
                    for _ in range(per_round):
                        times[i].append(self.one_step(step_model))
                        plain[i].append(self.one_step(self.twin, self.twin))
                        diffs[i].append(times[i][-1] - (before + plain[i][-1]) / 2)
                        before = plain[i][-1]
                finally:
                    self.reset()
                    undo()
        for (row, _), t, p, d in zip(configs, times, plain, diffs):
            row.update(
                step_s=statistics.median(t),
                plain_step_s=statistics.median(p),
                timed_steps=len(t),
                extra_step_s=statistics.median(d),
                extra_step_se_s=1.2533 * statistics.stdev(d) / len(d) ** 0.5,
            )


def _loss(out):
    from ckptplan.trace import default_loss

    return default_loss(out)


def run_policy(
    bench: Bench, name: str, knob, *, budget_bytes: int | None = None, later: list | None = None
) -> dict[str, Any]:
    """One anchor: measured now; its step timed now, or in ``bench.interleaved`` when ``later`` is a list
    (the row and how to apply the policy again are appended to it)."""
    row: dict[str, Any] = {"policy": name, "knob": str(knob) if knob is not None else ""}
    plain_s = bench.step_time(bench.model) if later is None else None  # no policy applied yet

    def apply() -> policies.Applied:
        return policies.apply_policy(name, bench.model, bench.args, bench.kwargs, knob, budget_bytes=budget_bytes)

    try:
        applied = apply()
    except policies.NotApplicable as e:
        return {**row, "error": f"not applicable: {e}"}
    except Exception as e:  # recorded, not hidden
        return {**row, "error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
    row.update(knob=applied.knob, setup_s=round(applied.setup_s, 3))
    try:
        row.update(bench.measure(applied.step_model, plain_s))
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        traceback.print_exc(limit=2)
    finally:
        applied.undo()

    def reapply() -> tuple[Any, Callable[[], None]]:
        again = apply()
        return again.step_model, again.undo

    if later is not None and "error" not in row:
        later.append((row, reapply))
    return row


def run_ckptplan(bench: Bench, graph, budget_bytes: int, objective: str, trace_s: float, later: list) -> dict[str, Any]:
    """ckptplan solved at ``budget_bytes`` and measured; its step is timed in ``bench.interleaved``."""
    row: dict[str, Any] = {"policy": "ckptplan" if objective == "time" else f"ckptplan-{objective}", "knob": ""}
    t = time.perf_counter()
    try:
        plan = ckptplan.solve(graph, budget_bytes, time_limit_s=30, objective=objective, gap=0.0)  # proven optimal
    except ckptplan.InfeasibleBudget as e:
        return {**row, "error": f"below the minimum {e.minimum_bytes}"}
    row.update(
        setup_s=round(trace_s + time.perf_counter() - t, 3),
        predicted_peak_bytes=plan.predicted_peak_bytes,
        predicted_extra_flops=plan.extra_forward_flops,
        predicted_cost_ns=plan.extra_cost_ns,
        status=plan.status,
        gap=plan.gap,
        regions=len(plan.regions),
        saved=saved_positions(plan),
    )
    with ckptplan.apply(bench.model, plan) as handle:
        row.update(bench.measure(bench.model))
        row["runtime_extra_flops"] = handle.stats.extra_forward_flops

    def apply() -> tuple[Any, Callable[[], None]]:
        handle = ckptplan.apply(bench.model, plan)
        return bench.model, handle.remove

    later.append((row, apply))
    return row


def saved_positions(plan: ckptplan.Plan) -> dict[str, list[int]]:
    """A plan's decisions as the results record them: region path -> positions of the ops it saves in the
    region (a rematerialization saves none), so that a later cost model can price what was measured."""
    return {r.path: [k for k, o in enumerate(r.ops) if o.decision is Decision.SAVE] for r in plan.regions}


def saved_ops(candidates: dict[str, Any], positions: dict[str, list[int]]) -> dict[str, frozenset[int]]:
    """``saved_positions``' record back as the simulator's decisions (region path -> graph op indices it
    saves), given the candidate regions by path (``shapes.candidates``)."""
    return {
        path: frozenset() if candidates[path].remat else frozenset(candidates[path].first_op + k for k in pos)
        for path, pos in positions.items()
    }


def predicted_cost(graph, regions, row: dict) -> int | None:
    """The cost model's recompute time for an anchor the simulator can predict (not compile, not sac_ilp)."""
    kind = {p.value: p for p in baselines.Policy}.get(row["policy"])
    if kind is None or (kind is baselines.Policy.SQRT_N and not baselines.sqrt_n_segments(graph, regions)[0]):
        return None
    k = int(row["knob"].removeprefix("k=")) if kind is baselines.Policy.EVERY_K else 1
    return baselines.evaluate(graph, regions, kind, k).extra_cost_ns


def bench_model(name: str, factory, steps: int, points: int, rounds: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model, args, kwargs = factory()
    bench = Bench(name, model, args, kwargs, steps)
    t = time.perf_counter()
    graph = ckptplan.trace(model, *args, **kwargs)
    trace_s = time.perf_counter() - t
    regions = candidate_regions(graph)
    plain = run_policy(bench, "none", None)
    out: dict[str, Any] = {
        "model": name,
        "forward_flops": graph.forward_flops,
        "trace_s": round(trace_s, 3),
        "predicted_no_checkpointing_peak_bytes": graph.baseline_peak_bytes,
        "no_checkpointing": plain,
        "fixed": [],
        "budgets": [],
    }
    print(f"[{name}] no checkpointing: {plain}", flush=True)
    later: list = []  # (row, apply) timed in interleaved rounds once everything is measured

    def finish(row: dict) -> dict:
        if "step_flops" in row:
            row["extra_flops"] = row["step_flops"] - plain["step_flops"]
            row["extra_flops_percent"] = round(100 * row["extra_flops"] / graph.forward_flops, 2)
        if "step_s" in row:
            row["time_ratio"] = round(row["step_s"] / row["plain_step_s"], 3)
        return row

    # Budget-independent policies: each knob once. The compiled ones are timed at once (compiling again
    # each round would dominate), the others in rounds.
    for policy, knobs in policies.KNOBS.items():
        if policy in ("none", "sac_ilp"):
            continue
        for knob in knobs:
            row = run_policy(bench, policy, knob, later=None if policy == "compile_budget" else later)
            if "error" not in row:
                row["predicted_cost_ns"] = predicted_cost(graph, regions, row)
            out["fixed"].append(row)

    # The budget sweep: no-checkpointing peak down to ckptplan's minimum.
    try:
        ckptplan.solve(graph, 1)
        minimum = 1
    except ckptplan.InfeasibleBudget as e:
        minimum = e.minimum_bytes
    top = plain["peak_bytes"]
    budgets = [round(top - i * (top - minimum) / (points - 1)) for i in range(points)]
    for budget in budgets:
        entry: dict[str, Any] = {"budget_bytes": budget, "rows": []}
        for objective in ("time", "flops"):
            entry["rows"].append(run_ckptplan(bench, graph, budget, objective, trace_s, later))
        if "sac_ilp" in policies.KNOBS:
            entry["rows"].append(run_policy(bench, "sac_ilp", "budget", budget_bytes=budget))
        out["budgets"].append(entry)

    bench.interleaved(later, rounds)
    for row in out["fixed"]:
        print(f"[{name}] {finish(row)}", flush=True)
    for entry in out["budgets"]:
        budget = entry["budget_bytes"]
        for row in entry["rows"]:
            print(f"[{name}] budget {budget}: {finish(row)}", flush=True)
        for policy in dict.fromkeys(r["policy"] for r in out["fixed"]):
            fitting = [
                r for r in out["fixed"] if r["policy"] == policy and "error" not in r and r["peak_bytes"] <= budget
            ]
            errors = [r["error"] for r in out["fixed"] if r["policy"] == policy and "error" in r]
            if fitting:
                best = min(fitting, key=lambda r: (r["extra_flops"], r["step_s"]))
                entry["rows"].append({**best, "best_of": len(fitting)})
            else:
                entry["rows"].append(
                    {"policy": policy, "knob": "", "fits": False, "error": errors[0] if errors else "no knob fits"}
                )
        for r in entry["rows"]:
            if "peak_bytes" in r:
                r["fits"] = r["peak_bytes"] <= budget
    out["rank_agreement"] = rank_agreement(out)
    return out


def timed_configs(result: dict) -> dict[tuple, dict]:
    """The configurations with a predicted time and a measured step: each anchor knob the simulator can
    predict, and ckptplan's plans (by budget index and objective)."""
    out: dict[tuple, dict] = {
        ("anchor", r["policy"], r["knob"]): r
        for r in result["fixed"]
        if r.get("predicted_cost_ns") is not None and "step_s" in r
    }
    for i, b in enumerate(result["budgets"]):
        for r in b["rows"]:
            if r["policy"].startswith("ckptplan") and "step_s" in r and "best_of" not in r:
                out[("plan", i, r["policy"])] = r
    return out


def step_ratio(row: dict) -> float:
    """A configuration's measured step time over the no-checkpointing step timed between its steps."""
    return row["step_s"] / row["plain_step_s"]


def rank_agreement(result: dict) -> dict[str, Any]:
    """Spearman correlation between predicted recompute time and measured step time (ratio to no
    checkpointing, timed between its steps)."""
    rows = list(timed_configs(result).values())
    pred = [r.get("predicted_cost_ns", 0) for r in rows]
    meas = [step_ratio(r) for r in rows]
    return {"configs": len(rows), "spearman": round(spearman(pred, meas), 3) if len(rows) > 2 else None}


# ---- targets ---------------------------------------------------------------------------------------
def targets(res: dict) -> dict[str, Any]:
    """The issue's targets for one model, checked on the measurements.

    * violations: ckptplan rows whose measured peak exceeds their budget;
    * flops_losses: (budget, anchor) where an anchor that fits has fewer measured extra FLOPs than the
      better of ckptplan's two plans at that budget;
    * time_losses: (budget, anchor) where an anchor that fits has a lower estimated recompute time than
      ckptplan (time objective), for the anchors the cost model can express;
    * gaps: the solver's proven gap per budget.
    """
    out: dict[str, Any] = {"violations": [], "flops_losses": [], "time_losses": [], "gaps": []}
    predicted = {(r["policy"], r["knob"]): r.get("predicted_cost_ns") for r in res["fixed"]}
    for b in res["budgets"]:
        mine = {r["policy"]: r for r in b["rows"] if r["policy"].startswith("ckptplan") and "peak_bytes" in r}
        for r in mine.values():
            if r["peak_bytes"] > b["budget_bytes"]:
                out["violations"].append([b["budget_bytes"], r["policy"], r["peak_bytes"]])
            out["gaps"].append(r.get("gap"))
        if not mine:
            continue
        best_flops = min(r["extra_flops"] for r in mine.values())
        for r in b["rows"]:
            if r["policy"].startswith("ckptplan") or not r.get("fits"):
                continue
            if r["extra_flops"] < best_flops:
                out["flops_losses"].append(
                    [b["budget_bytes"], f"{r['policy']} {r['knob']}".strip(), r["extra_flops"], best_flops]
                )
            cost = predicted.get((r["policy"], r["knob"]))
            if cost is not None and "ckptplan" in mine and cost < mine["ckptplan"]["predicted_cost_ns"]:
                out["time_losses"].append(
                    [
                        b["budget_bytes"],
                        f"{r['policy']} {r['knob']}".strip(),
                        cost,
                        mine["ckptplan"]["predicted_cost_ns"],
                    ]
                )
    out["max_gap"] = max((g for g in out["gaps"] if g is not None), default=None)
    del out["gaps"]
    return out


# ---- output ----------------------------------------------------------------------------------------
def markdown(results: list[dict], command: str, machine: str) -> str:
    lines = [
        f"# Policy benchmark\n\n`{command}` on {machine}. Measured on real CPU steps: peak by MemTracker, "
        "extra forward FLOPs by FlopCounterMode (whole step minus the no-checkpointing step, separate "
        "steps), step time as a ratio to no checkpointing timed step by step between its steps (medians; "
        "spread over interleaved rounds, except the compiled policy's). Per budget, each anchor's best knob "
        "that fits (fewest extra FLOPs); `-` = nothing fits.\n"
    ]
    for res in results:
        mib = 2**20
        lines.append(f"## {res['model']}\n")
        lines.append(
            f"no checkpointing: {res['no_checkpointing'].get('peak_bytes', 0) / mib:.1f} MiB; "
            f"rank agreement predicted vs measured recompute time (Spearman): "
            f"{res['rank_agreement']['spearman']} over {res['rank_agreement']['configs']} configs\n"
        )
        policies_seen = list(dict.fromkeys(r["policy"] for b in res["budgets"] for r in b["rows"]))
        lines.append("| budget MiB | " + " | ".join(policies_seen) + " |")
        lines.append("|---" * (len(policies_seen) + 1) + "|")
        for b in res["budgets"]:
            cells = []
            for p in policies_seen:
                r = next((r for r in b["rows"] if r["policy"] == p), None)
                if r is None or "peak_bytes" not in r or not r.get("fits"):
                    cells.append("-")
                else:
                    knob = f" {r['knob']}" if r.get("knob") else ""
                    cells.append(
                        f"{r['peak_bytes'] / mib:.1f} MiB, +{r['extra_flops_percent']:.0f}% FLOPs, "
                        f"x{r['time_ratio']:.2f}{knob}"
                    )
            lines.append(f"| {b['budget_bytes'] / mib:.1f} | " + " | ".join(cells) + " |")
        t = targets(res)
        lines.append(
            f"\ntargets: {len(t['violations'])} budget violations by ckptplan; max proven gap "
            f"{t['max_gap']}; anchors with fewer measured extra FLOPs than ckptplan's better plan: "
            f"{t['flops_losses'] or 'none'}; with a lower estimated recompute time: "
            f"{t['time_losses'] or 'none'}"
        )
        errors = {r["policy"]: r["error"] for r in res["fixed"] if "error" in r}
        errors.update(
            {
                r["policy"]: r["error"]
                for b in res["budgets"]
                for r in b["rows"]
                if "error" in r and not r["policy"].startswith("ckptplan") and r["error"] != "no knob fits"
            }
        )
        for p, e in sorted(errors.items()):
            lines.append(f"\n- {p}: {e}")
        lines.append("")
    return "\n".join(lines) + "\n"


def pareto(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results)
    cols = min(3, n)
    fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(5.2 * cols, 3.8 * math.ceil(n / cols)), squeeze=False)
    for ax, res in zip(axes.flat, results):
        points: dict[str, set] = {}
        rows = list(res["fixed"]) + [r for b in res["budgets"] for r in b["rows"] if "best_of" not in r]
        for r in rows:
            if "peak_bytes" in r and "extra_flops_percent" in r:
                points.setdefault(r["policy"], set()).add((r["peak_bytes"] / 2**20, r["extra_flops_percent"]))
        for policy, pts in sorted(points.items()):
            pts = sorted(pts)
            mine = policy.startswith("ckptplan")
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                "o-" if mine else "s:",
                label=policy,
                linewidth=2 if mine else 1,
                markersize=4,
            )
        ax.set(title=res["model"], xlabel="measured peak (MiB)", ylabel="extra forward FLOPs (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "policies"))
    ap.add_argument("--models", default=",".join(zoo()), help="comma-separated subset of the zoo")
    ap.add_argument("--steps", type=int, default=24, help="timed steps per configuration (median)")
    ap.add_argument("--rounds", type=int, default=4, help="rounds the timed steps are spread over")
    ap.add_argument("--points", type=int, default=POINTS, help="budgets per model")
    ap.add_argument("--render", action="store_true", help="only rewrite results.md and pareto.png from results.json")
    a = ap.parse_args()
    out = Path(a.out)
    if a.render:
        data = json.loads((out / "results.json").read_text())
        results, command, machine = data["results"], data["command"], data["machine"]
    else:
        allocator = steady_allocator()
        torch.set_num_threads(max(1, (os.cpu_count() or 2)))
        out.mkdir(parents=True, exist_ok=True)
        models = zoo()
        results = [bench_model(name, models[name], a.steps, a.points, a.rounds) for name in a.models.split(",")]
        for res in results:
            res["targets"] = targets(res)
        command = "python benchmarks/run.py " + " ".join(sys.argv[1:])
        machine = describe(allocator)
        (out / "results.json").write_text(
            json.dumps({"command": command, "machine": machine, "results": results}, indent=1) + "\n"
        )
    (out / "results.md").write_text(markdown(results, command, machine))
    pareto(results, out / "pareto.png")
    print(f"wrote {out}/results.json, results.md, pareto.png")


if __name__ == "__main__":
    main()
