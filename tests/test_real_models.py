"""Real models, the fast subset of benchmarks/real_models.py: architectures nobody here wrote (examples/hf_zoo.py),
traced, planned at a budget that forces checkpointing, applied; the planned step's gradients and buffers are
bitwise equal to the unplanned step's and MemTracker's peak is at or under the predicted peak.

Each case exercises something the hand-written examples do not: an encoder-decoder (BART), a vision transformer
with shifted windows (Swin), a frozen parameter (Whisper's ``embed_positions``), PyTorch's own
``nn.TransformerEncoder``. A case that fails today because of a known
open bug is a strict xfail naming it, so that it fails once the fix lands and the mark must go.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

import ckptplan

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
# Short solves (0.6 deterministic units each, conftest.py sets CKPTPLAN_WALL_SLACK): the plans need not be
# optimal here, only applied faithfully.
TIME_LIMIT_S = 3.0


def _bench():
    """benchmarks/real_models.py, whose ``run_budget`` plans, applies and compares one budget."""
    name = "ckptplan_bench_real_models"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "real_models.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


class KnownBug(AssertionError):
    """The step failed the way an open bug makes it fail (any other failure is a plain test failure)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Bug:
    reason: str
    seen: Callable[[dict], bool]  # whether a probe row shows this bug


# (model of hf_zoo.ZOO, budget: a fraction of the no-checkpointing peak or "minimum", known bug or None)
CASES = [
    ("bart", 0.8, None),  # encoder-decoder: two stacks, cross-attention
    ("bart", "minimum", None),  # at its minimum: MemTracker's module hooks once held gradients the step frees
    ("swin", 0.8, None),  # vision: patch merging, shifted windows, blocks nested two levels deep
    ("whisper", 0.8, None),  # a frozen parameter (encoder embed_positions) and an encoder-decoder
    ("torch_encoder", 0.8, None),  # nn.TransformerEncoder checkpointed without rematerialization inside
    ("torch_encoder", "minimum", None),  # rematerializes inside the layers; attn(x, x, x) recomputed as one object
]


@pytest.mark.parametrize("name,budget,bug", [
    pytest.param(n, b, bug, id=f"{n}-{b}",
                 marks=[pytest.mark.xfail(strict=True, raises=KnownBug, reason=bug.reason)] if bug else [])
    for n, b, bug in CASES])
def test_planned_step_is_bitwise_and_within_prediction(name, budget, bug):
    bench = _bench()
    model, args, kwargs = bench.hf_zoo.ZOO[name]()
    _, args2, kwargs2 = bench.hf_zoo.ZOO[name](seed=1)
    graph = ckptplan.trace(model, *args, **kwargs)
    step, second = bench.Step(model, args, kwargs), bench.Step(model, args2, kwargs2)
    ref, ref2 = step.run(), step.run(args2, kwargs2)
    if budget == "minimum":
        budget_bytes = bench.minimum_of(graph, TIME_LIMIT_S)["minimum_bytes"]
    else:
        budget_bytes = int(budget * graph.baseline_peak_bytes)
    assert budget_bytes < graph.baseline_peak_bytes, "the budget must force checkpointing"

    row = bench.run_budget(graph, step, second, ref, ref2, str(budget), budget_bytes, None, TIME_LIMIT_S)
    print(name, budget, row)
    if bug is not None and bug.seen(row):
        raise KnownBug(f"{bug.reason}: {row}")
    assert "error" not in row, row["error"]
    assert row["regions"] > 0, "a budget below the no-checkpointing peak must checkpoint something"
    assert row["bitwise"], f"gradients or buffers differ from the unplanned step: {row['differs']}"
    assert row["bitwise_new_batch"], "on a second batch, gradients or buffers differ from the unplanned step"
    assert row["measured_bytes"] <= row["predicted_bytes"] <= budget_bytes, row
