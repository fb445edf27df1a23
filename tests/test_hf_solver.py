"""The solver on Hugging Face architectures built from tiny configs (issue 34): what the candidates reach
against Hugging Face's own gradient checkpointing."""

from __future__ import annotations

import pytest
import torch

import ckptplan
from ckptplan.measure import measure_peak
from ckptplan.shapes import candidates
from ckptplan.solver.regions import candidate_regions, outermost
from ckptplan.solver.simulate import simulate


@pytest.fixture(scope="module")
def swin():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=4, num_labels=10
    )
    model = transformers.SwinForImageClassification(config)
    pixels, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    return model, pixels, labels, ckptplan.trace(model, pixels, labels=labels)


def test_blocks_one_level_below_a_stage_are_candidates(swin):
    """Swin's blocks sit at ``layers.N.blocks.M``, below the stages' ModuleList elements: candidates too."""
    *_, graph = swin
    paths = {r.path for r in candidate_regions(graph)}
    blocks = {f"swin.encoder.layers.{n}.blocks.{m}" for n in range(2) for m in range(2)}
    assert blocks <= paths
    assert {f"{b}.attention" for b in blocks} <= paths  # and their children, the finer granularity


def test_minimum_reaches_hugging_face_checkpointing(swin):
    """The lowest peak ckptplan reaches is at or below what HF's own full checkpointing measures (with
    the stages only, it was 36% above it)."""
    model, pixels, labels, graph = swin
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        hf_peak = measure_peak(model, pixels, labels=labels)
    finally:
        model.gradient_checkpointing_disable()
    with pytest.raises(ckptplan.InfeasibleBudget) as info:
        ckptplan.solve(graph, 1, rematerialize=False)
    assert info.value.minimum_proven
    assert info.value.minimum_bytes <= hf_peak
    plan = ckptplan.solve(graph, info.value.minimum_bytes, rematerialize=False)
    handle = ckptplan.apply(model, plan)
    try:
        assert measure_peak(model, pixels, labels=labels) <= plan.budget_bytes
    finally:
        handle.remove()


def test_mamba_minimum_without_a_proof_is_what_checkpoints_reach(monkeypatch):
    """Issue 34: on HF Mamba the minimum-peak search can end without a plan (under load, with or without
    rematerializations); the minimum then fell back to full checkpointing of the one outermost region,
    the whole backbone, whose peak is the unplanned peak, and was reported as proven. Checkpointing each
    block, which the simulator checks without a search, reaches 30% lower."""
    transformers = pytest.importorskip("transformers")
    from ckptplan.solver import cpsat

    torch.manual_seed(0)
    model = transformers.MambaForCausalLM(
        transformers.MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=100, state_size=8)
    )
    ids = torch.randint(0, 100, (2, 64))
    graph = ckptplan.trace(model, ids, labels=ids)
    real_solve = cpsat._Model.solve

    def no_minimum(self, **kwargs):  # every minimum-peak search ends at its limit with nothing
        if kwargs["budget_bytes"] is None:
            return cpsat.Solution(
                status=cpsat.Status.UNKNOWN,
                saved={},
                objective_ns=0,
                bound_ns=0,
                wall_s=0.0,
                deterministic_s=kwargs["deterministic_limit"],
                num_variables=0,
                num_constraints=0,
            )
        return real_solve(self, **kwargs)

    monkeypatch.setattr(cpsat._Model, "solve", no_minimum)
    with pytest.raises(ckptplan.InfeasibleBudget) as info:
        ckptplan.solve(graph, 1)
    regions = candidates(graph)
    # what the minimum fell back to: the outermost candidate, the whole backbone, checkpointed
    outer = simulate(graph, regions, {r.path: frozenset() for r in outermost(regions)}).peak_bytes
    assert outer == graph.baseline_peak_bytes
    assert not info.value.minimum_proven and info.value.minimum_bytes < 0.8 * outer
    # the plan's "full checkpointing" is each block's (as HF's), which reaches the same 30% lower
    assert ckptplan.solve(graph, "100%").full_peak_bytes < 0.8 * outer
    plan = ckptplan.solve(graph, info.value.minimum_bytes)
    assert plan.predicted_peak_bytes <= info.value.minimum_bytes
