"""Runtime overhead: what ckptplan's runtime costs beyond the recomputation the cost model charges.

Run by hand (about 2 minutes on 2 cores):
    pip install -c constraints.txt -e ".[bench]"
    python benchmarks/runtime_overhead.py --out benchmarks/results/runtime_overhead

ckptplan's runtime wraps every checkpointed region in ``torch.utils.checkpoint`` with PyTorch's
selective-checkpointing dispatch modes (its policy checks the op sequence against the plan; a second
mode counts the FLOPs actually recomputed). The cost model (costmodel.py) charges the recomputed ops
only. Per model, interleaved in rounds so that drift of the machine cancels, the median step time of:

* ``plain``: no checkpointing;
* ``torch_full``: ``torch.utils.checkpoint`` (non-reentrant) around every block, no dispatch modes;
* ``ckptplan_full``: a ckptplan plan checkpointing the same blocks, saving nothing (same recomputation);
* ``ckptplan_save_all``: the same blocks, every op that may be saved saved (almost nothing recomputed).

``ckptplan_save_all - plain`` is the dispatch overhead with no recompute to speak of;
``ckptplan_full - torch_full`` is the same overhead on top of the same recomputation.
Writes runtime_overhead.json (with the command and the machine) and runtime_overhead.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # as the tests: the same kernels every run

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

import gpt2  # noqa: E402
import llama  # noqa: E402
import policies  # noqa: E402  (benchmarks/, beside this file)

import ckptplan  # noqa: E402
from ckptplan import planner  # noqa: E402
from ckptplan.solver import baselines  # noqa: E402
from ckptplan.solver.regions import candidate_regions  # noqa: E402
from ckptplan.trace import default_loss  # noqa: E402

MODELS = {  # the policy benchmark's sizes
    "gpt2": lambda: gpt2.gpt2_tiny(batch_size=8, seq_len=128),
    "llama": lambda: llama.llama_tiny(batch_size=8, seq_len=128),
}


def plan_for(graph, saved: dict[str, frozenset[int]]) -> ckptplan.Plan:
    """A plan with exactly these decisions (planner._plan is what solve() writes its answer with)."""
    shapes = planner._Shapes(graph)
    sim, base = shapes.simulate(saved), shapes.simulate({})
    return planner._plan(shapes, saved, sim, budget_bytes=sim.peak_bytes, budget_text=str(sim.peak_bytes),
                         reserve=0.0, baseline=base, full=sim, status="feasible", gap=1.0, objective="time",
                         solve_time_s=0.0, stats={})


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

    configs = {"plain": step_time, "torch_full": torch_full, "ckptplan_full": lambda: with_plan(full),
               "ckptplan_save_all": lambda: with_plan(save_all)}
    times: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(rounds):
        for key, run in configs.items():
            times[key].append(run())
    med = {k: statistics.median(v) for k, v in times.items()}
    ops = sum(len(r.ops) for r in blocks)
    return {"model": name, "blocks": len(blocks), "ops_in_blocks": ops,
            "rerun_ops_full": sum(r.recompute_end - r.first_op for r in blocks),
            "extra_forward_percent": {"full": round(100 * full.extra_forward_fraction, 1),
                                      "save_all": round(100 * save_all.extra_forward_fraction, 1)},
            "median_step_ms": {k: round(1e3 * v, 1) for k, v in med.items()},
            "rounds_ms": {k: [round(1e3 * x, 1) for x in v] for k, v in times.items()},
            "dispatch_overhead_ms": round(1e3 * (med["ckptplan_save_all"] - med["plain"]), 1),
            "overhead_over_torch_full_ms": round(1e3 * (med["ckptplan_full"] - med["torch_full"]), 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "runtime_overhead"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=7)
    a = ap.parse_args()
    rows = [one(name, a.rounds, a.steps) for name in MODELS]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"command": "python benchmarks/runtime_overhead.py --out benchmarks/results/runtime_overhead",
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
                         f"torch {torch.__version__}",
              "rows": rows}
    (out / "runtime_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Runtime overhead\n", f"`{result['command']}` on {result['machine']}; median step time (ms) over "
             f"{a.rounds} interleaved rounds of {a.steps} steps.\n",
             "| model | ops in blocks | plain | torch full | ckptplan full | ckptplan save-all | dispatch overhead "
             "(save-all - plain) | ckptplan full - torch full |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["median_step_ms"]
        lines.append(f"| {r['model']} | {r['ops_in_blocks']} | {m['plain']} | {m['torch_full']} | {m['ckptplan_full']} | "
                     f"{m['ckptplan_save_all']} | {r['dispatch_overhead_ms']} | {r['overhead_over_torch_full_ms']} |")
    (out / "runtime_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
