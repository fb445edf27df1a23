"""torch.compile's memory budget against eager checkpointing at 0 extra FLOPs on the convolutional nets.

Run by hand (about a minute on 2 cores):
    pip install -c constraints.txt -e ".[bench]"
    python benchmarks/compile_vs_eager.py --out benchmarks/results/compile_vs_eager

For the policy benchmark's ResNet and U-Net (benchmarks/run.py's zoo), at the compile knob that recomputes
0 FLOPs with the lowest measured peak there (the knob that once beat ckptplan on FLOPs):

1. what the compiled forward keeps: the outputs of the partitioned forward graph (the loss and every
   tensor saved for backward) under ``torch.compile(backend="aot_eager")`` with
   ``torch._functorch.config.activation_memory_budget``, in bytes per op that made them;
2. the eager floor: the lowest budget at which ckptplan (``objective="flops"``, no reserve) still
   recomputes 0 FLOPs, by bisection, and the simulated peak of its plan there: with checkpoints only
   (``rematerialize=False``) and with rematerializations (the default);
3. an experiment outside the product: checkpointing runs of consecutive ``Sequential`` elements, from
   each BatchNorm through the next convolution (or the end), nothing saved inside, each run one
   checkpoint, simulated with ckptplan's simulator. Such runs are not candidate regions of ckptplan
   (a plan checkpoints module calls); this measures what they would give.

Writes compile_vs_eager.json (with the command and the machine) and compile_vs_eager.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ckptplan
from ckptplan.solver.regions import Region, _overheads, candidate_regions
from ckptplan.solver.simulate import simulate

import run as bench  # the zoo, and the examples on sys.path
from common import describe

ROOT = Path(__file__).resolve().parent.parent

MiB = 2**20
KNOBS = {"resnet": 0.8, "unet": 0.8}  # the 0-FLOP knobs with the lowest measured peak in benchmarks/results/policies


def compiled_saves(name: str, knob: float) -> dict[str, int]:
    """Bytes of the compiled forward's outputs (loss and saved tensors), per op that made them."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch import config
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    model, args, kwargs = bench.zoo()[name]()
    kept: Counter[str] = Counter()

    def forward(gm: torch.fx.GraphModule, _example: list) -> object:
        for node in next(iter(gm.graph.find_nodes(op="output"))).args[0]:
            value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
            if isinstance(value, torch.Tensor):
                made_by = str(node.target) if node.op == "call_function" else node.op
                kept[made_by] += value.numel() * value.element_size()
        return gm.forward

    previous = config.activation_memory_budget
    torch._dynamo.reset()
    config.activation_memory_budget = knob
    try:  # aot_eager's own partitioner, with a forward compiler that looks at the partitioned graph
        backend = aot_autograd(
            fw_compiler=forward, bw_compiler=lambda gm, _: gm.forward, partition_fn=min_cut_rematerialization_partition
        )
        torch.compile(model, backend=backend)(*args, **kwargs)
    finally:
        config.activation_memory_budget = previous
        torch._dynamo.reset()
    return dict(kept.most_common())


def zero_flop_floor(graph, *, rematerialize: bool) -> dict:
    """The lowest budget (to 16 KiB) at which ckptplan's FLOPs-optimal plan recomputes nothing."""

    def zero_at(budget: int):
        try:
            plan = ckptplan.solve(graph, budget, reserve=0.0, objective="flops", gap=0.0, rematerialize=rematerialize)
        except ckptplan.InfeasibleBudget:
            return None
        return plan if plan.extra_forward_flops == 0 else None

    lo, hi = 0, graph.baseline_peak_bytes  # zero_at(hi) holds: nothing needs recomputing
    while hi - lo > 16 * 1024:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if zero_at(mid) is not None else (mid, hi)
    plan = zero_at(hi)
    return {
        "budget_bytes": hi,
        "predicted_peak_bytes": plan.predicted_peak_bytes,
        "regions": [r.path for r in plan.regions if not r.remat],
        "rematerialized": [r.path for r in plan.regions if r.remat],
    }


def sequential_runs(graph) -> dict:
    """Simulated peak and FLOPs of checkpointing every BatchNorm-to-next-convolution run of a Sequential."""
    types = dict(graph.module_tree)
    runs = []
    for path, kind in graph.module_tree:
        if kind != "Sequential":
            continue
        elements = [p for p in types if p.startswith(path + ".") and "." not in p[len(path) + 1 :]]
        for i, p in enumerate(elements):
            if types[p].startswith("BatchNorm"):
                end = next(
                    (j for j in range(i + 1, len(elements)) if types[elements[j]].startswith("Conv")), len(elements) - 1
                )
                runs.append(elements[i : end + 1])
    regions = [r for r in (_run_region(graph, run) for run in runs) if r is not None]
    if not regions:
        return {"runs": 0}
    sim = simulate(graph, candidate_regions(graph) + tuple(regions), {r.path: frozenset() for r in regions})
    return {"runs": len(regions), "peak_bytes": sim.peak_bytes, "extra_forward_flops": sim.extra_forward_flops}


def _run_region(graph, paths: list[str]) -> Region | None:
    """Consecutive module calls checkpointed as one unit (the shape of ``regions.segment``)."""
    calls = [next((m for m in graph.modules if m.path == p and m.call_index == 0), None) for p in paths]
    if any(c is None for c in calls) or any(a.end_op != b.first_op for a, b in zip(calls, calls[1:])):
        return None  # a call missing, or ops of the parent between two of them
    first, end = calls[0].first_op, calls[-1].end_op
    made = {s for i in range(first, end) for s in graph.ops[i].allocates}
    unpacks = [c.first_unpack_event for c in calls if c.first_unpack_event is not None]
    if not unpacks:
        return None
    rerun_end = max(c.recompute_end_op for c in calls)
    return Region(
        path=f"{paths[0]}..{paths[-1]}",
        type_name="run",
        first_op=first,
        end_op=end,
        recompute_end=rerun_end,
        recompute_event=min(unpacks),
        release_event=max(c.last_unpack_event for c in calls if c.last_unpack_event is not None),
        input_storages=tuple(dict.fromkeys(s for c in calls for s in c.input_storages if s not in made)),
        choices=(),
        forced=(),
        mutated_buffers=(),
        members=tuple(paths),
        checkpoint_ns=_overheads(graph, first, end, rerun_end)[0],
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compile_vs_eager"))
    a = ap.parse_args()
    rows = []
    for name, knob in KNOBS.items():
        model, args, kwargs = bench.zoo()[name]()
        graph = ckptplan.trace(model, *args, **kwargs)
        rows.append(
            {
                "model": name,
                "compile_knob": knob,
                "compiled_forward_keeps": compiled_saves(name, knob),
                "eager_no_checkpointing_peak_bytes": graph.baseline_peak_bytes,
                "eager_zero_flop_floor": zero_flop_floor(graph, rematerialize=False),
                "eager_zero_flop_floor_rematerializing": zero_flop_floor(graph, rematerialize=True),
                "sequential_runs": sequential_runs(graph),
            }
        )
        print(rows[-1], flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/compile_vs_eager.py " + " ".join(sys.argv[1:])
    machine = describe()
    (out / "compile_vs_eager.json").write_text(
        json.dumps({"command": command, "machine": machine, "rows": rows}, indent=1) + "\n"
    )
    lines = [
        "# torch.compile's memory budget against eager checkpointing at 0 extra FLOPs\n",
        f"`{command}` on {machine}. Predicted peaks are ckptplan's simulator's (MiB); the compiled "
        "forward's outputs are the loss and every tensor it saves for backward.\n",
        "| model | compile knob | compiled forward keeps (MiB, by op) | eager, no checkpointing | "
        "eager 0-FLOP floor, checkpoints only (`--no-remat`): budget / predicted peak | its regions | "
        "eager 0-FLOP floor, rematerializing (the default): budget / predicted peak | its regions, "
        "rematerializations | Sequential runs (experiment): peak, extra FLOPs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        keeps = ", ".join(
            f"{op.removeprefix('aten.').removesuffix('.default')} {b / MiB:.2f}"
            for op, b in r["compiled_forward_keeps"].items()
            if b >= MiB // 100
        )
        total = sum(r["compiled_forward_keeps"].values()) / MiB
        floor, runs = r["eager_zero_flop_floor"], r["sequential_runs"]
        remat = r["eager_zero_flop_floor_rematerializing"]
        seq = (
            f"{runs['runs']} runs: {runs['peak_bytes'] / MiB:.2f}, {runs['extra_forward_flops']}"
            if runs.get("runs")
            else "none"
        )
        lines.append(
            f"| {r['model']} | {r['compile_knob']} | {total:.2f}: {keeps} | "
            f"{r['eager_no_checkpointing_peak_bytes'] / MiB:.2f} | {floor['budget_bytes'] / MiB:.2f} / "
            f"{floor['predicted_peak_bytes'] / MiB:.2f} | {', '.join(floor['regions'])} | "
            f"{remat['budget_bytes'] / MiB:.2f} / {remat['predicted_peak_bytes'] / MiB:.2f} | "
            f"{', '.join(remat['regions']) or 'none'}; {len(remat['rematerialized'])} | {seq} |"
        )
    (out / "compile_vs_eager.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
