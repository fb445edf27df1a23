"""A plan under DDP and FSDP2 (fully_shard): 2 gloo processes on CPU, gradients equal to one process."""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ckptplan
from ckptplan.parallel import for_ranks

from .conftest import ROOT

WORLD = 2
BATCH = 16  # the whole batch; each rank takes BATCH // WORLD rows


def _model():
    sys.path.insert(0, str(ROOT / "examples"))
    import llama

    return llama.llama_tiny(batch_size=BATCH, seq_len=128, n_layer=4)


def _shard(args, rank):
    n = BATCH // WORLD
    return tuple(a[rank * n : (rank + 1) * n] for a in args)


def _worker(rank: int, port: int, wrapper: str, plan_yaml: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        model, args = _model()
        plan = ckptplan.plan.plan_from_dict(__import__("yaml").safe_load(plan_yaml))
        handle = ckptplan.apply(model, plan)  # before wrapping: module paths are the model's own
        if wrapper == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            wrapped = DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard

            for layer in model.layers:
                fully_shard(layer)
            wrapped = fully_shard(model)
        if wrapper == "ddp":
            from torch.distributed._tools.mem_tracker import MemTracker

            tracker = MemTracker()
            tracker.track_external(wrapped)
        else:
            from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

            tracker = FSDPMemTracker(wrapped)
        with tracker:
            wrapped(*_shard(args, rank)).backward()
        peak = max(s["Total"] for s in tracker.get_tracker_snapshot("peak").values())
        grads = {}
        for n, p in model.named_parameters():
            g = p.grad
            grads[n] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
        if rank == 0:
            torch.save(
                {"grads": grads, "extra": handle.stats.extra_forward_flops, "peak": peak},
                os.path.join(out_dir, "r0.pt"),
            )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference():
    """Single process, whole batch: the mean loss's gradients, and the trace of one rank's step."""
    model, args = _model()
    model(*args).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads, ckptplan.trace(model, *_shard(args, 0))  # the budget is per rank: trace one rank's step


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
def test_plan_under_data_parallel_fits_per_rank_and_matches_one_process(reference, wrapper, tmp_path):
    grads, graph = reference
    per_rank = for_ranks(graph, world_size=WORLD, mode=wrapper)
    try:
        plan = ckptplan.solve(per_rank, "50%")
    except ckptplan.InfeasibleBudget as e:
        plan = ckptplan.solve(per_rank, e.minimum_bytes)
    assert plan.regions and plan.parallel == f"{wrapper}:{WORLD}"
    mp.spawn(_worker, args=(_free_port(), wrapper, plan.to_yaml(), str(tmp_path)), nprocs=WORLD, join=True)
    out = torch.load(tmp_path / "r0.pt")
    assert out["extra"] == plan.extra_forward_flops
    # per-rank memory (MemTracker for DDP, FSDPMemTracker for FSDP2): under budget, prediction within 10%
    assert out["peak"] <= plan.budget_bytes
    assert abs(out["peak"] - plan.predicted_peak_bytes) <= 0.10 * plan.predicted_peak_bytes
    for n, g in grads.items():
        # the same math, reduced across ranks in another order: equal to float rounding
        assert torch.allclose(out["grads"][n], g, rtol=1e-5, atol=1e-6), n


def test_per_rank_transformation(reference):
    _, graph = reference
    fsdp = for_ranks(graph, world_size=4, mode="fsdp")
    kinds = {s.id: s.kind.value for s in graph.storages}
    for before, after in zip(graph.storages, fsdp.storages):
        if kinds[before.id] in ("param", "grad"):
            assert after.nbytes == -(-before.nbytes // 4)
        else:
            assert after.nbytes == before.nbytes
    names = dict(graph.tensor_names)
    sizes = {}
    for s in graph.storages:
        if s.kind.value == "param":
            unit = next(
                (u for u in ("layers.0", "layers.1", "layers.2", "layers.3") if names[s.id].startswith(u + ".")), ""
            )
            sizes[unit] = sizes.get(unit, 0) + s.nbytes
    root = sizes.pop("")
    assert fsdp.extra_fixed_bytes == root + 3 * max(sizes.values())
    assert fsdp.fingerprint != graph.fingerprint and fsdp.parallel == "fsdp:4"
    ddp = for_ranks(graph, world_size=4, mode="ddp")
    assert ddp.extra_fixed_bytes == sum(s.nbytes for s in graph.storages if s.kind.value == "grad")
    assert for_ranks(graph, world_size=4, mode="ddp", bucket_view=True).extra_fixed_bytes == 0
    with pytest.raises(ckptplan.InputError, match="already per rank"):
        for_ranks(fsdp, world_size=2, mode="fsdp")


def test_cli_parallel_options(tmp_path):
    from typer.testing import CliRunner

    from ckptplan.cli import app

    spec = ["-m", str(ROOT / "examples" / "llama.py") + ":llama_tiny", "-a", "batch_size=8", "-a", "seq_len=128"]
    ok = CliRunner().invoke(
        app,
        [
            "solve",
            "-b",
            "60%",
            *spec,
            "--parallel",
            "fsdp",
            "--world-size",
            "2",
            "-o",
            str(tmp_path / "p.yaml"),
            "--json",
        ],
    )
    assert ok.exit_code == 0, ok.output
    assert ckptplan.load_plan(tmp_path / "p.yaml").parallel == "fsdp:2"
    for bad in (["--parallel", "zero"], ["--world-size", "2"], ["--world-size", "0", "--parallel", "ddp"]):
        result = CliRunner().invoke(app, ["solve", "-b", "60%", *spec, *bad])
        assert result.exit_code == 2, (bad, result.output)
