"""Predicted vs measured per-rank peak under DDP and FSDP2 (2 gloo ranks on CPU).

Run by hand: python benchmarks/parallel_memory.py --out benchmarks/results/parallel_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import ckptplan
from ckptplan.parallel import for_ranks

ROOT = Path(__file__).resolve().parent.parent

WORLD, BATCH, LAYERS, SEQ = 2, 8, 4, 128


def build():
    import llama

    return llama.llama_tiny(batch_size=BATCH, seq_len=SEQ, n_layer=LAYERS)


def shard(args, rank):
    n = BATCH // WORLD
    return tuple(a[rank * n : (rank + 1) * n] for a in args)


def measure(rank, port, mode, plan_yaml, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    model, args = build()
    if plan_yaml:
        ckptplan.apply(model, ckptplan.plan.plan_from_dict(__import__("yaml").safe_load(plan_yaml)))
    if mode == "fsdp":
        from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer)
        wrapped = fully_shard(model)
        tracker = FSDPMemTracker(wrapped)
    else:
        from torch.distributed._tools.mem_tracker import MemTracker
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model)
        tracker = MemTracker()
        tracker.track_external(wrapped)
    with tracker:
        wrapped(*shard(args, rank)).backward()
    peak = max(s["Total"] for s in tracker.get_tracker_snapshot("peak").values())
    if rank == 0:
        Path(out).write_text(str(peak))
    dist.destroy_process_group()


def port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "parallel_memory.json"))
    out = Path(ap.parse_args().out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model, args = build()
    graph = ckptplan.trace(model, *shard(args, 0))
    rows = []
    for mode in ("ddp", "fsdp"):
        g = for_ranks(graph, world_size=WORLD, mode=mode)
        for budget in (None, "70%", "50%"):
            plan = None
            if budget:
                try:
                    plan = ckptplan.solve(g, budget)
                except ckptplan.InfeasibleBudget as e:
                    plan = ckptplan.solve(g, e.minimum_bytes)
            tmp = out.with_suffix(".tmp")
            mp.spawn(measure, args=(port(), mode, plan.to_yaml() if plan else "", str(tmp)), nprocs=WORLD)
            measured = int(tmp.read_text())
            tmp.unlink()
            predicted = plan.predicted_peak_bytes if plan else g.baseline_peak_bytes
            rows.append(
                {
                    "mode": mode,
                    "budget": plan.budget_bytes if plan else None,
                    "predicted": predicted,
                    "measured": measured,
                    "ratio": round(measured / predicted, 4),
                    "fits": plan is None or measured <= plan.budget_bytes,
                }
            )
            print(rows[-1], flush=True)
    out.write_text(
        json.dumps(
            {
                "command": "python benchmarks/parallel_memory.py",
                "machine": "2-core CPU, gloo",
                "model": f"llama_tiny batch {BATCH} seq {SEQ} layers {LAYERS}, world {WORLD}",
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
