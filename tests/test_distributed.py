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

from .conftest import ROOT

WORLD = 2
BATCH = 8  # the whole batch; each rank takes BATCH // WORLD rows


def _model():
    sys.path.insert(0, str(ROOT / "examples"))
    import llama

    return llama.llama_tiny(batch_size=BATCH, seq_len=64, n_layer=3)


def _shard(args, rank):
    n = BATCH // WORLD
    return tuple(a[rank * n:(rank + 1) * n] for a in args)


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
        wrapped(*_shard(args, rank)).backward()
        grads = {}
        for n, p in model.named_parameters():
            g = p.grad
            grads[n] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
        if rank == 0:
            torch.save({"grads": grads, "extra": handle.stats.extra_forward_flops}, os.path.join(out_dir, "r0.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference():
    """Single process, whole batch: the mean loss's gradients, and a plan for one rank's shard."""
    model, args = _model()
    model(*args).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    graph = ckptplan.trace(model, *_shard(args, 0))  # the budget is per rank: plan the per-rank step
    plan = ckptplan.solve(graph, "60%")
    assert plan.regions
    return grads, plan


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_plan_under_data_parallel_matches_one_process(reference, wrapper, tmp_path):
    grads, plan = reference
    mp.spawn(_worker, args=(_free_port(), wrapper, plan.to_yaml(), str(tmp_path)), nprocs=WORLD, join=True)
    out = torch.load(tmp_path / "r0.pt")
    assert out["extra"] == plan.extra_forward_flops
    for n, g in grads.items():
        # the same math, reduced across ranks in another order: equal to float rounding
        assert torch.allclose(out["grads"][n], g, rtol=1e-5, atol=1e-6), n
