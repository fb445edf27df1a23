"""A plan made for a training step steps aside in another mode, and Hugging Face's KV cache is turned off
for training as its own gradient checkpointing does."""

from __future__ import annotations

import logging

import pytest
import torch

import ckptplan
from ckptplan.trace import default_loss

from .conftest import MODELS, assert_same, grads_after


def _grads(model, args, kwargs=None):
    return grads_after(model, lambda: default_loss(model(*args, **(kwargs or {}))))


def test_eval_mode_with_gradients_steps_aside(traced, caplog):
    model, args, graph = traced("gpt2")
    plan = ckptplan.solve(graph, "70%", time_limit_s=20)
    assert plan.regions and not plan.eval_modules
    model.eval()
    try:
        unplanned = _grads(model, args)
        handle = ckptplan.apply(model, plan)
        try:
            with caplog.at_level(logging.WARNING, logger="ckptplan"):
                planned = _grads(model, args)  # a validation loss without no_grad: no PlanMismatch
            assert "eval mode" in caplog.text
            assert_same(unplanned, planned)
            assert handle.stats.extra_forward_flops == 0
            model.train()
            handle.remove()
            reference = _grads(model, args)
            handle = ckptplan.apply(model, plan)
            trained = _grads(model, args)  # back in training: the plan applies again
            assert handle.stats.recomputed_regions > 0
            assert_same(reference, trained)
        finally:
            handle.remove()
    finally:
        model.train()


def test_frozen_batch_norm_is_planned_as_traced():
    model, args = MODELS["resnet"]()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()  # fine-tuning with frozen BatchNorm statistics
    graph = ckptplan.trace(model, *args)
    assert graph.eval_modules and all("bn" in p or "shortcut" in p or "stem" in p for p in graph.eval_modules)
    plan = ckptplan.solve(graph, "75%", time_limit_s=20)
    assert plan.eval_modules == graph.eval_modules
    assert ckptplan.load_plan(_roundtrip(plan)) == plan
    reference = _grads(model, args)
    handle = ckptplan.apply(model, plan)
    try:
        planned = _grads(model, args)
        assert handle.stats.recomputed_regions > 0  # the plan ran: same modes as the traced step
        assert_same(reference, planned)
    finally:
        handle.remove()


def _roundtrip(plan):
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / "plan.yaml"
    plan.save(path)
    return path


def test_hugging_face_cache_is_turned_off_for_training(caplog):
    pytest.importorskip("transformers")
    import hf_models

    model, args, kwargs = hf_models.hf_gpt2_tiny(batch_size=2, seq_len=32, n_layer=2)
    model.config.use_cache = True  # transformers' default
    with caplog.at_level(logging.WARNING, logger="ckptplan"):
        graph = ckptplan.trace(model, *args, **kwargs)
    assert "use_cache" in caplog.text and model.config.use_cache is True
    try:
        plan = ckptplan.solve(graph, "80%", time_limit_s=20)
    except ckptplan.InfeasibleBudget as e:
        plan = ckptplan.solve(graph, e.minimum_bytes, time_limit_s=20)
    assert plan.regions
    reference = _grads(model, args, kwargs | {"use_cache": False})
    handle = ckptplan.apply(model, plan)
    try:
        assert model.config.use_cache is False
        planned = _grads(model, args, kwargs)
        assert_same(reference, planned)
    finally:
        handle.remove()
    assert model.config.use_cache is True
