"""Shared fixtures: tiny models whose step is dominated by activations, traced once per session."""

from __future__ import annotations

import os
import sys

# Some CI sandboxes advertise AMX in CPUID but trap its instructions (SIGILL in oneDNN's bf16 matmul,
# seen on a 2-core Xeon VM): cap oneDNN at AVX512-BF16 before torch loads. A user's setting wins.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
# Solves end on CP-SAT's deterministic clock, not on a busy machine's wall clock (planner.WALL_SLACK_ENV):
# the same plan however loaded the machine is (a served solve's process inherits it).
os.environ.setdefault("CKPTPLAN_WALL_SLACK", "20")
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import gpt2
import llama
import resnet
import unet

ROOT = Path(__file__).resolve().parent.parent

torch.set_num_threads(1)  # stable timings and no oversubscription on 2-core CI machines


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """ruff and mypy (test_lint.py) first: CI reports lint and type errors before the long tests."""
    items.sort(key=lambda item: item.path.name != "test_lint.py")  # stable: the rest keep their order


# name -> factory of (model, args); each a different shape of model
MODELS = {
    "gpt2": lambda: gpt2.gpt2_tiny(batch_size=8, seq_len=128),  # dropout, SDPA, tied weights
    "resnet": lambda: resnet.resnet_tiny(batch_size=32),  # BatchNorm, skips, in-place ReLU
    "llama": lambda: llama.llama_tiny(batch_size=8, seq_len=128),  # RMSNorm, rotary, SwiGLU, GQA
    "unet": lambda: unet.unet_tiny(batch_size=8, image_size=64),  # not a chain: skip concatenations
}


@pytest.fixture(scope="session")
def traced():
    """name -> (model, args, graph), built and traced once."""
    import ckptplan

    cache = {}

    def get(name: str):
        if name not in cache:
            model, args = MODELS[name]()
            cache[name] = (model, args, ckptplan.trace(model, *args))
        return cache[name]

    return get


def solve_at(graph, fraction: float):
    """The plan at ``fraction`` of the no-checkpointing peak, or at the minimum when that is higher."""
    import ckptplan

    try:
        return ckptplan.solve(graph, int(fraction * graph.baseline_peak_bytes), time_limit_s=20)
    except ckptplan.InfeasibleBudget as e:
        return ckptplan.solve(graph, e.minimum_bytes, time_limit_s=20)


def grads_after(model, step) -> dict[str, torch.Tensor]:
    """Parameter gradients of one ``step()`` (a loss) from seed 7; the model's .grad fields left empty."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    step().backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


def assert_same(a: dict, b: dict) -> None:
    """Bitwise equal gradients, parameter by parameter."""
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"
