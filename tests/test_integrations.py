"""ckptplan.integrations.transformers: apply_to_pretrained and the Trainer callback, on a tiny GPT-2.

The callback is driven through its hooks with the arguments a Trainer passes (a shuffling DataLoader, an
AdamW optimizer) and then trained the way the Trainer's compute_loss calls the model; a real Trainer needs
accelerate, which ckptplan does not depend on."""

from __future__ import annotations

import copy
import importlib
import sys
from types import SimpleNamespace

import pytest
import torch

import ckptplan

transformers = pytest.importorskip("transformers")

from ckptplan.integrations.transformers import CkptplanCallback, apply_to_pretrained  # noqa: E402  needs transformers

import hf_models  # noqa: E402  needs transformers; examples/, on sys.path by conftest

B, T = 4, 64


def grads(model, batch):
    """Parameter gradients of one step from a fixed RNG seed (dropout masks identical between runs)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1234)
    model(**batch).loss.backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


def middle_budget(model, optimizer=None, **batch) -> int:
    """A budget halfway between the lowest peak any plan reaches and the unplanned peak."""
    graph = ckptplan.trace(model, optimizer=optimizer, **batch)
    with pytest.raises(ckptplan.InfeasibleBudget) as e:
        ckptplan.solve(graph, 1, time_limit_s=20)
    return (e.value.minimum_bytes + graph.baseline_peak_bytes) // 2


@pytest.fixture(scope="module")
def gpt2():
    model, _, _ = hf_models.hf_gpt2_tiny(batch_size=B, seq_len=T)
    batch = {"input_ids": torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))}
    batch["labels"] = batch["input_ids"]
    return model, batch, middle_budget(model, **batch)


def test_apply_to_pretrained_keeps_gradients_and_cache_setting(gpt2):
    model, batch, budget = gpt2
    want = grads(copy.deepcopy(model), batch)
    model.config.use_cache = True  # the transformers default, which training with a plan turns off
    model.eval()  # as from_pretrained returns it: the plan is still for the training step
    handle = apply_to_pretrained(model, budget=budget, batch_size=B, seq_len=T, time_limit_s=20)
    try:
        assert not model.training, "the model's mode is restored"
        assert handle.plan.regions and handle.plan.eval_modules == ()
        assert model.config.use_cache is False
        model.train()
        got = grads(model, batch)  # input_ids and labels drawn as apply_to_pretrained draws them
        assert handle.stats.extra_forward_flops > 0, "the plan ran"
        for name in want:
            assert torch.equal(got[name], want[name]), name
    finally:
        handle.remove()
    assert model.config.use_cache is True
    model.config.use_cache = False
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_apply_to_pretrained_refuses_what_it_cannot_plan(gpt2):
    model, batch, budget = gpt2
    with pytest.raises(ckptplan.InputError, match="batch_size"):
        apply_to_pretrained(model, budget=budget)
    with pytest.raises(ckptplan.InputError, match="PreTrainedModel"):
        apply_to_pretrained(torch.nn.Linear(2, 2), budget=budget, batch_size=1, seq_len=1)
    with pytest.raises(ckptplan.InputError, match="dict"):
        apply_to_pretrained(model, budget=budget, example_inputs=(batch["input_ids"],))
    new = hasattr(model, "activation_checkpointing_enable")  # transformers 5's name; 4.x has the older one
    (model.activation_checkpointing_enable if new else model.gradient_checkpointing_enable)()
    try:
        with pytest.raises(ckptplan.InputError, match="gradient_checkpointing_disable"):
            apply_to_pretrained(model, budget=budget, example_inputs=batch)
    finally:
        (model.activation_checkpointing_disable if new else model.gradient_checkpointing_disable)()


def trainer_step(model, batch):
    """One step as Trainer.compute_loss runs it for a model that takes loss keyword arguments."""
    inputs = {**batch, "num_items_in_batch": batch["labels"].ne(-100).sum()}
    model(**inputs).loss.backward()
    model.zero_grad(set_to_none=True)


def test_callback_plans_the_first_batch_and_removes_at_the_end(gpt2):
    model, batch, _ = gpt2
    budget = middle_budget(model, optimizer="adamw", **batch, num_items_in_batch=batch["labels"].ne(-100).sum())
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 1024, (3 * B, T))]
    loader = torch.utils.data.DataLoader(rows, batch_size=B, shuffle=True, drop_last=True)
    opt = torch.optim.AdamW(model.parameters())
    args, state, control = SimpleNamespace(gradient_checkpointing=False), SimpleNamespace(), SimpleNamespace()
    cb = CkptplanCallback(budget=budget, time_limit_s=20)
    rng = torch.get_rng_state()
    cb.on_train_begin(args, state, control, model=model, train_dataloader=loader, optimizer=opt)
    try:
        assert torch.equal(torch.get_rng_state(), rng), "the data order is unchanged"
        assert cb.handle is not None and cb.handle.plan.regions
        assert cb.handle.plan.optimizer == "adamw"
        assert "int64[]" in cb.handle.plan.inputs  # num_items_in_batch, as the Trainer passes it
        for b in loader:  # every batch of the epoch runs with the plan
            trainer_step(model, b)
            assert cb.handle.stats.extra_forward_flops > 0
    finally:
        cb.on_train_end(args, state, control, model=model)
    assert cb.handle is None and ckptplan.runtime.Handle.of(model) is None


def test_callback_with_a_given_shape(gpt2):
    model, _, budget = gpt2
    args = SimpleNamespace(gradient_checkpointing=False)
    cb = CkptplanCallback(budget=budget, batch_size=B, seq_len=T, time_limit_s=20)
    cb.on_train_begin(args, None, None, model=model, train_dataloader=None)
    try:
        assert cb.handle.plan.inputs == (f"int64[{B}, {T}]", f"int64[{B}, {T}]")
    finally:
        cb.on_train_end(args, None, None)
    assert ckptplan.runtime.Handle.of(model) is None


def test_callback_refuses_hf_checkpointing_and_half_a_shape(gpt2):
    model, _, budget = gpt2
    with pytest.raises(ckptplan.InputError, match="gradient_checkpointing"):
        CkptplanCallback(budget=budget).on_train_begin(
            SimpleNamespace(gradient_checkpointing=True), None, None, model=model
        )
    with pytest.raises(ckptplan.InputError, match="both"):
        CkptplanCallback(budget=budget, batch_size=B)
    with pytest.raises(ckptplan.InputError, match="train_dataloader"):
        CkptplanCallback(budget=budget).on_train_begin(SimpleNamespace(), None, None, model=model)


def test_missing_transformers_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # what an absent package imports as
    monkeypatch.delitem(sys.modules, "ckptplan.integrations.transformers")
    with pytest.raises(ImportError, match="pip install transformers"):
        importlib.import_module("ckptplan.integrations.transformers")
