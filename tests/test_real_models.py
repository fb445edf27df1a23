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

The slow half is marked ``slow`` (CI runs it; ``pytest -m "not slow"`` skips it). A mixture of experts
routes each batch its own way: its plan trains every batch bitwise, but at the minimum budget the new
batch's peak is not asserted (a routing the trace did not see can peak higher: README's known limits).
"""

from __future__ import annotations

import importlib.util
import sys
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


ROUTED = True  # routes tokens by their values (a mixture of experts): see the module's docstring

# (model of hf_zoo.ZOO, slow, routes tokens by their values): the fast half covers one of each kind but state-space
FAST, SLOW = False, True
CASES = [
    ("gpt2", FAST, False),  # decoder: Conv1D projections, tied embeddings, dropout
    ("bert", FAST, False),  # encoder: at its minimum, a layer's last LayerNorm output is cached (KNOWN)
    ("bart", FAST, False),  # encoder-decoder: two stacks, cross-attention
    ("vit", FAST, False),  # vision transformer
    ("resnet", FAST, False),  # convolutional: BatchNorm statistics, in-place ReLU
    ("torch_encoder", FAST, False),  # nn.TransformerEncoder: attn(x, x, x) recomputed as one object
    ("torch_decoder", FAST, False),  # nn.TransformerDecoder: causal mask, cross-attention to a memory
    ("torch_mha", FAST, False),  # nn.MultiheadAttention with dropout
    ("llama", SLOW, False),
    ("mistral", SLOW, False),
    ("qwen2", SLOW, False),
    ("gemma2", SLOW, False),
    ("gpt_neox", SLOW, False),
    ("opt", SLOW, False),
    ("roberta", SLOW, False),
    ("t5", SLOW, False),
    ("whisper", SLOW, False),  # a frozen parameter; positions reach a recipe through detach
    ("swin", SLOW, False),  # shifted windows, blocks nested two levels deep
    ("convnext", SLOW, False),  # depthwise convolutions, layer scale
    ("clip", SLOW, False),  # multimodal: a text and a vision tower
    ("mamba", SLOW, False),  # state-space
    ("mixtral", SLOW, ROUTED),
    ("qwen2_moe", SLOW, ROUTED),
]


def _budgets(baseline: int, minimum: int) -> list[tuple[str, int]]:
    return [*((f"{f:.2f} of the way", minimum + int(f * (baseline - minimum))) for f in BETWEEN), ("minimum", minimum)]


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


# A layer's last LayerNorm output, cached by selective checkpointing at the minimum and saved by the next
# layer too, is alive through the rerun; the simulator does not count it there yet (test_sim_bytes.py's
# strict xfail says why): measured 34,048 B over the prediction when the minimum's plan caches it.
CACHED_OUTPUT = pytest.mark.xfail(
    strict=False, raises=AssertionError, reason="issue 34: a cached region output alive through the rerun"
)
# OPT: 2,048 B over at 1/3 of the way; Mamba: 8,192 B at 2/3 (two rematerializations). Both were exact with the
# rule in the simulator (the real-models branch), and are over without it.
KNOWN = {"bert": CACHED_OUTPUT, "roberta": CACHED_OUTPUT, "opt": CACHED_OUTPUT, "mamba": CACHED_OUTPUT}


@pytest.mark.parametrize(
    "name,routed",
    [
        pytest.param(
            n, routed, id=n, marks=[*([pytest.mark.slow] if slow else []), *([KNOWN[n]] if n in KNOWN else [])]
        )
        for n, slow, routed in CASES
    ],
)
def test_three_budgets_down_to_the_minimum(name, routed):
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
    for row in rows:
        where = f"{name} at {row['budget']} ({row['budget_bytes']} B)"
        assert "error" not in row, f"{where}: {row['error']}"
        assert row["regions"] > 0, f"{where}: a budget below the no-checkpointing peak must checkpoint something"
        assert row["bitwise"], f"{where}: gradients or buffers differ from the unplanned step: {row['differs']}"
        assert row["bitwise_new_batch"], f"{where}: on a new batch, gradients or buffers differ"
        if not (routed and row["budget"] == "minimum"):
            assert row["fits_new_batch"], f"{where}: on a new batch, the peak is over: {row}"
        assert row["measured_bytes"] <= row["predicted_bytes"] <= row["budget_bytes"], f"{where}: {row}"

    hf_peak = _hf_peak(model, step)
    if hf_peak is not None:
        assert minimum <= hf_peak, f"{name}: minimum {minimum} B is above HF checkpointing's peak {hf_peak} B"
