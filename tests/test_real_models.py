"""Real models (issue 29): architectures nobody here wrote (examples/hf_zoo.py), each at three budgets down to
its minimum: traced, solved, applied, stepped on the traced batch and on a new one.

For every model of ``hf_zoo.ZOO`` (decoders, encoders, encoder-decoders, mixture-of-experts, vision
transformers, convolutional networks, a state-space model, a multimodal model, and PyTorch's own
``nn.TransformerEncoder``, ``nn.TransformerDecoder`` and ``nn.MultiheadAttention``):

* the minimum budget comes from a solve at 1 byte (``InfeasibleBudget.minimum_bytes``);
* at two budgets between the minimum and the no-checkpointing peak and at the minimum itself, the plan's
  step has gradients and buffers bitwise equal to the unplanned step's, on the traced batch and on a
  second batch of new random inputs; MemTracker's peak is at or under the simulator's prediction, which is
  at or under the budget, and the second batch's peak is at or under the budget too;
* where the model supports Hugging Face's ``gradient_checkpointing_enable()``, the minimum is at or below
  the peak that HF's own full checkpointing measures.

The slow half is marked ``slow`` (CI runs it; ``pytest -m "not slow"`` skips it). A model that fails today
because of a known open bug is a strict xfail naming it, so that it fails once the fix lands and the mark
must go.
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
# optimal here, only applied faithfully and within their budget.
TIME_LIMIT_S = 3.0
# Where the two budgets above the minimum lie, as fractions of the way from the minimum to the unplanned peak.
BETWEEN = (2 / 3, 1 / 3)


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


def _routing_broke(row: dict) -> bool:
    """A plan made for one routing of the tokens failed at another: a recipe's op saw other shapes, or the
    peak grew past the budget, or the second batch's step differs."""
    return ("PlanMismatch" in row.get("error", "") or row.get("fits") is False
            or row.get("bitwise_new_batch") is False or row.get("fits_new_batch") is False)


MOE = Bug(reason="issue 29: a plan holds for the traced routing only (data-dependent expert token counts)",
          seen=_routing_broke)


def _over_prediction(row: dict) -> bool:
    return row.get("measured_bytes", 0) > row.get("predicted_bytes", float("inf"))


# Whisper's encoder makes its positions with torch.arange, detaches them (an op the recipe mode ignores) and
# embeds them: the recipe of the positions' sum records the detached tensor, another Python object than the
# arange it made, as an input of its own, and holds the forward's copy until the rerun (256 B at the minimum).
DETACHED_INPUT = Bug(reason="rematerialize.py: a recipe holds a tensor it made when it reaches a later op through "
                            "detach (Whisper's encoder positions)", seen=_over_prediction)

# (model of hf_zoo.ZOO, slow, known bug or None): the fast half covers one of each kind but state-space
FAST, SLOW = False, True
CASES = [
    ("gpt2", FAST, None),  # decoder: Conv1D projections, tied embeddings, dropout
    ("bert", FAST, None),  # encoder: at its minimum, a layer's last LayerNorm output is cached (test_sim_bytes)
    ("bart", FAST, None),  # encoder-decoder: two stacks, cross-attention
    ("vit", FAST, None),  # vision transformer
    ("resnet", FAST, None),  # convolutional: BatchNorm statistics, in-place ReLU
    ("torch_encoder", FAST, None),  # nn.TransformerEncoder: attn(x, x, x) recomputed as one object
    ("torch_decoder", FAST, None),  # nn.TransformerDecoder: causal mask, cross-attention to a memory
    ("torch_mha", FAST, None),  # nn.MultiheadAttention with dropout
    ("llama", SLOW, None),
    ("mistral", SLOW, None),
    ("qwen2", SLOW, None),
    ("gemma2", SLOW, None),
    ("gpt_neox", SLOW, None),
    ("opt", SLOW, None),
    ("roberta", SLOW, None),
    ("t5", SLOW, None),
    ("whisper", SLOW, DETACHED_INPUT),  # a frozen parameter (encoder embed_positions)
    ("swin", SLOW, None),  # shifted windows, blocks nested two levels deep
    ("convnext", SLOW, None),  # depthwise convolutions, layer scale
    ("clip", SLOW, None),  # multimodal: a text and a vision tower
    ("mamba", SLOW, None),  # state-space
    ("mixtral", SLOW, MOE),
    ("qwen2_moe", SLOW, MOE),
]


def _budgets(baseline: int, minimum: int) -> list[tuple[str, int]]:
    return [*((f"{f:.2f} of the way", minimum + int(f * (baseline - minimum))) for f in BETWEEN),
            ("minimum", minimum)]


def _hf_peak(model, step) -> int | None:
    """MemTracker's peak of the step under Hugging Face's own full checkpointing, where the model has it."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        return None
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5's name; the old one is deprecated
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    try:
        return step.peak()
    finally:
        getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)()


@pytest.mark.parametrize("name,bug", [
    pytest.param(n, bug, id=n, marks=[
        *([pytest.mark.slow] if slow else []),
        *([pytest.mark.xfail(strict=True, raises=KnownBug, reason=bug.reason)] if bug else [])])
    for n, slow, bug in CASES])
def test_three_budgets_down_to_the_minimum(name, bug):
    bench = _bench()
    model, args, kwargs = bench.hf_zoo.ZOO[name]()
    _, args2, kwargs2 = bench.hf_zoo.ZOO[name](seed=1)
    graph = ckptplan.trace(model, *args, **kwargs)
    step, second = bench.Step(model, args, kwargs), bench.Step(model, args2, kwargs2)
    ref, ref2 = step.run(), step.run(args2, kwargs2)
    minimum = bench.minimum_of(graph, TIME_LIMIT_S)["minimum_bytes"]
    assert minimum < graph.baseline_peak_bytes, "checkpointing must lower the peak"

    rows = []
    for label, budget in _budgets(graph.baseline_peak_bytes, minimum):
        row = bench.run_budget(graph, step, second, ref, ref2, label, budget, None, TIME_LIMIT_S)
        print(name, row)
        rows.append(row)
    if bug is not None and any(bug.seen(r) for r in rows):
        raise KnownBug(f"{bug.reason}: {rows}")
    for row in rows:
        where = f"{name} at {row['budget']} ({row['budget_bytes']} B)"
        assert "error" not in row, f"{where}: {row['error']}"
        assert row["regions"] > 0, f"{where}: a budget below the no-checkpointing peak must checkpoint something"
        assert row["bitwise"], f"{where}: gradients or buffers differ from the unplanned step: {row['differs']}"
        assert row["bitwise_new_batch"], f"{where}: on a new batch, gradients or buffers differ"
        assert row["fits_new_batch"], f"{where}: on a new batch, the peak {row['measured_new_batch_bytes']} B is over"
        assert row["measured_bytes"] <= row["predicted_bytes"] <= row["budget_bytes"], f"{where}: {row}"

    hf_peak = _hf_peak(model, step)
    if hf_peak is not None:
        assert minimum <= hf_peak, f"{name}: minimum {minimum} B is above HF checkpointing's peak {hf_peak} B"
