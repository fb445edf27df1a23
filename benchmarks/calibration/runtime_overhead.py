"""Runtime overhead: what ckptplan's runtime costs beyond the ops it reruns, and the cost model's constants.

Run by hand (about 2 minutes on 2 cores):
    pip install -c constraints.txt -e ".[bench]"
    python benchmarks/calibration/runtime_overhead.py --out benchmarks/results/runtime_overhead

ckptplan's runtime wraps a region that saves some ops in ``torch.utils.checkpoint`` with PyTorch's
selective-checkpointing dispatch modes (its policy checks the op sequence against the plan; a second
mode counts the FLOPs actually recomputed), and a region that saves nothing in plain
``torch.utils.checkpoint`` once its first step has checked its ops. costmodel.py charges both.

1. Rates (``calibrate_rates``): every forward op of the policy benchmark's zoo, timed inside a dispatch
   mode (the kernel and C++ dispatch, not the mode's Python; median of several passes) and classed as the
   cost model classes it: views give the fixed part, ops with FLOPs the FLOP rate, random ops the rate
   of random bytes drawn, the others the memory bandwidth (attention on CPU, whose FLOPs torch does not
   count, is left out). Each rate is the total of its class's work over its total time less the fixed part.
2. Runtime overheads (``calibrate``): a chain of blocks of tiny ops (``tanh``, 4x8), where the runtime's own
   cost dominates, timed forward and backward separately without a plan, with every block checkpointed
   saving nothing (plain), and saving every op (selective, nothing rerun). With B blocks of K ops:
   plain - none = B * (call + K * (hooks + rerun op)), from (64 x 1) and (4 x 64) blocks;
   selective - plain, per op: the dispatch modes in forward, and in backward the replay less the rerun
   op. These are tight-loop figures (the GPU profile's host overheads are these, rounded); tanh's
   one-tensor ops understate selective checkpointing's cost on real ops (tuples, more arguments to walk),
   hence the real models below (``sac_ns_per_op_visit``).

These are the forward-pass rates and tight-loop overheads. ``costmodel.CPU`` takes them scaled as
calibration/region_costs.py measures them paid in real steps (a recomputation reads cold inputs; the
runtime's Python runs between large kernels): the table's costmodel.CPU column differs from the fit by
those factors.
3. Real models, interleaved in rounds so that drift of the machine cancels, the median step time of:

   * ``plain``: no checkpointing;
   * ``torch_full``: ``torch.utils.checkpoint`` (non-reentrant) around every block, no dispatch modes;
   * ``ckptplan_full``: a ckptplan plan checkpointing the same blocks, saving nothing (same recomputation);
   * ``ckptplan_save_all``: the same blocks, every op that may be saved saved (almost nothing recomputed);

   beside each, the cost model's estimate of what the plan adds to the step, and selective
   checkpointing's measured cost per op visited (``_sac_per_visit``).

Writes runtime_overhead.json (with the command and the machine) and runtime_overhead.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # as the tests: the same kernels every run

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import SAC_IGNORED_OPS

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, run.py, policies.py

import ckptplan
from ckptplan import costmodel, decisions, shapes as shapes_mod
from ckptplan.solver import baselines
from ckptplan.solver.regions import candidate_regions
from ckptplan.trace import default_loss

import gpt2
import llama
import policies
from common import describe

ROOT = Path(__file__).resolve().parents[2]

MODELS = {  # the policy benchmark's sizes
    "gpt2": lambda: gpt2.gpt2_tiny(batch_size=8, seq_len=128),
    "llama": lambda: llama.llama_tiny(batch_size=8, seq_len=128),
}


def plan_for(graph, saved: dict[str, frozenset[int]]) -> ckptplan.Plan:
    """A plan with exactly these decisions (decisions.make_plan is what solve() writes its answer with)."""
    shapes = shapes_mod.Shapes(graph)
    sim, base = shapes.simulate(saved), shapes.simulate({})
    return decisions.make_plan(
        shapes,
        saved,
        sim,
        budget_bytes=sim.peak_bytes,
        budget_text=str(sim.peak_bytes),
        reserve=0.0,
        baseline=base,
        full=sim,
        status="feasible",
        gap=1.0,
        objective="time",
        solve_time_s=0.0,
        stats={},
    )


class _Tiny(nn.Module):
    """K tanh ops on a 4x8 tensor: each allocates its output and saves it for backward."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.k):
            x = torch.tanh(x)
        return x


class _TinyChain(nn.Module):
    def __init__(self, blocks: int, k: int) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.blocks = nn.Sequential(*[_Tiny(k) for _ in range(blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.inp(x)).sum()


def _split_times(model: nn.Module, x: torch.Tensor, steps: int) -> tuple[float, float]:
    """Median forward and backward seconds of ``steps`` steps, after two warm-ups (the first checks the
    op sequence of regions that then run plain)."""
    fwd, bwd = [], []
    for _ in range(steps + 2):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = model(x)
        t1 = time.perf_counter()
        loss.backward()
        fwd.append(t1 - t0)
        bwd.append(time.perf_counter() - t1)
    return statistics.median(fwd[2:]), statistics.median(bwd[2:])


def _chain_times(blocks: int, k: int, rounds: int, steps: int) -> dict[str, tuple[float, float]]:
    torch.manual_seed(0)
    model, x = _TinyChain(blocks, k), torch.randn(4, 8)
    graph = ckptplan.trace(model, x)
    chosen = [r for r in candidate_regions(graph) if r.path.startswith("blocks.")]
    plans = {
        "plain": plan_for(graph, {r.path: frozenset() for r in chosen}),
        "selective": plan_for(graph, {r.path: frozenset(r.choices) for r in chosen}),
    }
    runs: dict[str, list[tuple[float, float]]] = {"none": [], "plain": [], "selective": []}
    for _ in range(rounds):
        runs["none"].append(_split_times(model, x, steps))
        for key, plan in plans.items():
            with ckptplan.apply(model, plan):
                runs[key].append(_split_times(model, x, steps))
    return {key: (statistics.median(f for f, _ in v), statistics.median(b for _, b in v)) for key, v in runs.items()}


def calibrate(rounds: int, steps: int) -> dict:
    """The runtime's overheads on this machine, in ns (see the module docstring)."""
    small, large = (64, 1), (4, 64)
    t = {shape: _chain_times(*shape, rounds, 4 * steps) for shape in (small, large)}

    def per_region(shape: tuple[int, int]) -> float:  # plain - none, per block
        return (sum(t[shape]["plain"]) - sum(t[shape]["none"])) / shape[0]

    slope = (per_region(large) - per_region(small)) / (large[1] - small[1])  # per op: hooks + rerun op
    call = per_region(small) - small[1] * slope
    n = large[0] * large[1]
    op = t[large]["none"][0] / n  # one tiny op, forward
    sac_forward = (t[large]["selective"][0] - t[large]["plain"][0]) / n
    sac_replay = (t[large]["selective"][1] - t[large]["plain"][1]) / n + op  # the walk, less the rerun op
    fitted = {
        "checkpoint_call_ns": call,
        "checkpoint_op_ns": slope - op,
        "sac_forward_ns": sac_forward,
        "sac_replay_ns": sac_replay,
        "tiny_op_ns": op,
    }
    return {
        "chains": {
            f"{b}x{k}": {key: [round(1e6 * x, 1) for x in v] for key, v in t[(b, k)].items()} for b, k in (small, large)
        },
        "fitted_ns": {key: round(1e9 * v) for key, v in fitted.items()},
        "costmodel_cpu_ns": {key: getattr(costmodel.CPU, key) for key in fitted if key != "tiny_op_ns"},
    }


class _OpTimer(TorchDispatchMode):
    """The wall time of each op below this mode: its kernel and the dispatch under Python."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t = time.perf_counter_ns()
        out = func(*args, **(kwargs or {}))
        if func not in SAC_IGNORED_OPS:  # the trace leaves them out too (detach)
            self.ops.append((str(func), time.perf_counter_ns() - t))
        return out


def forward_op_ns(model: nn.Module, args: tuple, kwargs: dict, graph, passes: int) -> list[float] | None:
    """Each forward op of ``graph`` (traced from this model and inputs) timed under ``_OpTimer``: the median
    over ``passes`` forward passes after one to warm up; None if a pass ran other ops than the trace."""
    runs = []
    for _ in range(passes + 1):
        with _OpTimer() as timer:
            default_loss(model(*args, **kwargs))
        runs.append(timer.ops)
    names = [op.name for op in graph.ops]
    if any([n for n, _ in r] != names for r in runs):
        return None
    return [statistics.median(r[i][1] for r in runs[1:]) for i in range(len(names))]


def calibrate_rates(passes: int) -> dict:
    """The cost model's rates on this machine, from the zoo's forward ops (see the module docstring)."""
    import run as policy_benchmark  # benchmarks/run.py: the zoo

    classes: dict[str, list[tuple[int, float]]] = {
        "view": [],
        "flops": [],
        "bytes": [],
        "slow_bytes": [],
        "random": [],
    }  # work, ns
    per_model: dict[str, Any] = {}
    for name, factory in policy_benchmark.zoo().items():
        torch.manual_seed(0)
        model, args, kwargs = factory()
        graph = ckptplan.trace(model, *args, **kwargs)
        ns = forward_op_ns(model, args, kwargs, graph, passes)
        if ns is None:
            per_model[name] = "skipped: the timed pass ran other ops than the trace"
            continue
        per_model[name] = {"forward_ops": len(ns), "timed_ms": round(sum(ns) / 1e6, 2)}
        for op, t in zip(graph.ops, ns):
            if op.view:
                classes["view"].append((0, t))
            elif "scaled_dot_product" in op.name:
                continue  # its FLOPs are not counted on CPU (flops.cost_flops adds them)
            elif op.random:
                classes["random"].append((max((o.nbytes for o in op.outputs), default=0), t))
            # by class only: the ops costmodel.CPU prices at rates of their own (OpRate: convolutions,
            # BatchNorm, GELU) count in their class here; op_rates.py and region_costs.py measure those
            elif op.flops:
                classes["flops"].append((op.flops, t))
            else:
                classes["slow_bytes" if costmodel.is_slow(op.name) else "bytes"].append((op.bytes_moved, t))
    fixed = statistics.median(t for _, t in classes["view"])

    def rate(key: str) -> float:
        amount = sum(w for w, _ in classes[key])
        return amount / max(1.0, sum(t - fixed for _, t in classes[key])) * 1e9

    return {
        "models": per_model,
        "ops_per_class": {k: len(v) for k, v in classes.items()},
        "view_op_ns": round(fixed),
        "flops_per_s": rate("flops"),
        "bytes_per_s": rate("bytes"),
        "slow_bytes_per_s": rate("slow_bytes"),
        "random_bytes_per_s": rate("random"),
        "costmodel_cpu": {
            "flops_per_s": costmodel.CPU.flops_per_s,
            "bytes_per_s": costmodel.CPU.bytes_per_s,
            "slow_bytes_per_s": costmodel.CPU.slow_bytes_per_s,
            "random_bytes_per_s": costmodel.CPU.random_bytes_per_s,
        },
    }


def one(name: str, rounds: int, steps: int) -> dict:
    torch.manual_seed(0)
    model, args = MODELS[name]()
    graph = ckptplan.trace(model, *args)
    regions = candidate_regions(graph)
    blocks = baselines.blocks(graph, regions)
    full = plan_for(graph, {r.path: frozenset() for r in blocks})
    save_all = plan_for(graph, {r.path: frozenset(r.choices) for r in blocks})

    def step_time() -> float:
        times = []
        for _ in range(steps + 1):  # the first is a warm-up
            model.zero_grad(set_to_none=True)
            torch.manual_seed(1234)
            t = time.perf_counter()
            default_loss(model(*args)).backward()
            times.append(time.perf_counter() - t)
        return statistics.median(times[1:])

    def torch_full() -> float:  # the policy benchmark's "full" anchor: the same blocks
        applied = policies.apply_policy("full", model, args, {}, None)
        try:
            return step_time()
        finally:
            applied.undo()

    def with_plan(plan: ckptplan.Plan) -> float:
        with ckptplan.apply(model, plan):
            return step_time()

    configs = {
        "plain": step_time,
        "torch_full": torch_full,
        "ckptplan_full": lambda: with_plan(full),
        "ckptplan_save_all": lambda: with_plan(save_all),
    }
    times: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(rounds):
        for key, run in configs.items():
            times[key].append(run())
    med = {k: statistics.median(v) for k, v in times.items()}
    ops = sum(len(r.ops) for r in blocks)
    return {
        "model": name,
        "blocks": len(blocks),
        "ops_in_blocks": ops,
        "rerun_ops_full": sum(r.recompute_end - r.first_op for r in blocks),
        "extra_forward_percent": {
            "full": round(100 * full.extra_forward_fraction, 1),
            "save_all": round(100 * save_all.extra_forward_fraction, 1),
        },
        "median_step_ms": {k: round(1e3 * v, 1) for k, v in med.items()},
        "rounds_ms": {k: [round(1e3 * x, 1) for x in v] for k, v in times.items()},
        "dispatch_overhead_ms": round(1e3 * (med["ckptplan_save_all"] - med["plain"]), 1),
        "overhead_over_torch_full_ms": round(1e3 * (med["ckptplan_full"] - med["torch_full"]), 1),
        # what the plans add to a step: measured, and the cost model's estimate (simulate.py)
        "added_ms": {
            "full": round(1e3 * (med["ckptplan_full"] - med["plain"]), 1),
            "save_all": round(1e3 * (med["ckptplan_save_all"] - med["plain"]), 1),
        },
        "estimated_ms": {
            "full": round(full.extra_cost_ns / 1e6, 1),
            "save_all": round(save_all.extra_cost_ns / 1e6, 1),
        },
        "sac_ns_per_op_visit": round(_sac_per_visit(blocks, full, save_all, med)),
    }


def _sac_per_visit(blocks, full: ckptplan.Plan, save_all: ckptplan.Plan, med: dict[str, float]) -> float:
    """Selective checkpointing's cost per op it visits (in forward, and again in the recomputation),
    measured on a real model: save-all pays it and the forced reruns, full pays every rerun, so
    dispatch = (save-all - full) + the reruns save-all avoids; those are the model's estimate, scaled
    by what it gets wrong on the full plan's reruns."""
    dispatch_est = sum(r.selective_ns for r in blocks)
    visits = sum(len(r.ops) + (r.recompute_end - r.first_op) for r in blocks)
    full_measured = 1e9 * (med["ckptplan_full"] - med["plain"])
    avoided = (full.extra_cost_ns - (save_all.extra_cost_ns - dispatch_est)) * full_measured / full.extra_cost_ns
    return (1e9 * (med["ckptplan_save_all"] - med["ckptplan_full"]) + avoided) / visits


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "runtime_overhead"))
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps", type=int, default=7)
    a = ap.parse_args()
    rates = calibrate_rates(a.rounds)
    calibration = calibrate(a.rounds, a.steps)
    rows = [one(name, a.rounds, a.steps) for name in MODELS]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "command": "python benchmarks/calibration/runtime_overhead.py --out benchmarks/results/runtime_overhead",
        "machine": describe(),
        "rates": rates,
        "calibration": calibration,
        "rows": rows,
    }
    (out / "runtime_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    fitted, used = calibration["fitted_ns"], calibration["costmodel_cpu_ns"]
    lines = [
        "# Runtime overhead\n",
        f"`{result['command']}` on {result['machine']}.\n",
        "## Rates (the zoo's forward ops, timed one by one)\n",
        "| rate | fitted here | costmodel.CPU |",
        "|---|---|---|",
    ]
    lines += [f"| {key} | {rates[key]:.3g} | {rates['costmodel_cpu'][key]:.3g} |" for key in rates["costmodel_cpu"]]
    lines += [
        "",
        f"(ops per class: {json.dumps(rates['ops_per_class'])}; a view op: {rates['view_op_ns']} ns under "
        "the timing mode)\n",
        "## Runtime overheads (chains of tiny ops; ns)\n",
        "| constant | fitted here | costmodel.CPU |",
        "|---|---|---|",
    ]
    lines += [f"| {key} | {fitted[key]} | {used[key]} |" for key in used]
    per_visit = ", ".join(f"{r['model']} {r['sac_ns_per_op_visit']}" for r in rows)
    lines += [
        "",
        f"Selective checkpointing per op visited on the real models (last column below): {per_visit} ns; "
        f"costmodel.CPU charges {used['sac_forward_ns']} in forward and {used['sac_replay_ns']} in the "
        "recomputation (tanh's one-tensor ops, above, cost it half).\n",
    ]
    lines += [
        "",
        f"(one tiny op, forward: {fitted['tiny_op_ns']} ns; chain medians, forward and backward in us: "
        f"{json.dumps(calibration['chains'])})\n",
        f"## Real models: median step time (ms) over {a.rounds} interleaved rounds of {a.steps} steps\n",
        "| model | ops in blocks | plain | torch full | ckptplan full | ckptplan save-all "
        "| ckptplan full - torch full "
        "| added by full: measured / estimated | added by save-all: measured / estimated "
        "| selective checkpointing per op visit (ns) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m, added, est = r["median_step_ms"], r["added_ms"], r["estimated_ms"]
        lines.append(
            f"| {r['model']} | {r['ops_in_blocks']} | {m['plain']} | {m['torch_full']} "
            f"| {m['ckptplan_full']} | {m['ckptplan_save_all']} | {r['overhead_over_torch_full_ms']} "
            f"| {added['full']} / {est['full']} | "
            f"{added['save_all']} / {est['save_all']} | {r['sac_ns_per_op_visit']} |"
        )
    (out / "runtime_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
