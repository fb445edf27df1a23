"""The tracer: what it records, on real, meta and fake tensors, and that it leaves the model alone."""

from __future__ import annotations

import copy
import resource

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

import ckptplan
from ckptplan.graph import StorageKind
from ckptplan.measure import measure_peak

from .conftest import MODELS


@pytest.mark.parametrize("name", sorted(MODELS))
def test_baseline_peak_matches_memtracker(traced, name):
    model, args, graph = traced(name)
    model.zero_grad(set_to_none=True)
    measured = measure_peak(model, *args)
    model.zero_grad(set_to_none=True)
    assert measured == graph.baseline_peak_bytes  # inputs included on both sides


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_flops_match_flop_counter(traced, name):
    model, args, graph = traced(name)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(*args)
    assert graph.forward_flops == counter.get_total_flops()
    model.zero_grad(set_to_none=True)


def test_trace_leaves_model_state_and_rng_alone(traced):
    model, args, _ = traced("resnet")
    before = copy.deepcopy(model.state_dict())
    sentinel = {n: torch.full_like(p, 7.0) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = sentinel[n]
    rng = torch.get_rng_state()
    ckptplan.trace(model, *args)
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"
    for n, p in model.named_parameters():
        assert p.grad is sentinel[n]
    model.zero_grad(set_to_none=True)


def test_flags_random_view_inplace_and_buffers(traced):
    _, _, g = traced("gpt2")
    random_ops = [op for op in g.ops if op.random]
    assert random_ops and all("dropout" in op.name or "bernoulli" in op.name for op in random_ops)
    assert any(op.view for op in g.ops if op.name.startswith("aten.view"))
    _, _, r = traced("resnet")
    relus = [op for op in r.ops if op.name == "aten.relu_.default"]
    assert relus and all(op.mutates and not op.allocates for op in relus)
    names = dict(r.tensor_names)
    bn_writes = {names[s] for op in r.ops if "batch_norm" in op.name for s in op.mutates}
    assert "layer1.0.bn1.running_mean" in bn_writes and "layer1.0.bn1.running_var" in bn_writes


def test_saved_tensors_and_lifetimes_are_consistent(traced):
    _, _, g = traced("llama")
    saved = [s for s in g.storages if s.saved_by and s.kind is StorageKind.ACTIVATION]
    assert saved
    for s in g.storages:
        assert s.free_event <= g.num_events
        if s.kind is StorageKind.ACTIVATION:
            assert 0 <= s.alloc_event < g.num_forward
            assert s.alloc_event < s.free_event
            assert s.python_free_op <= g.num_forward
    # an activation saved for backward outlives the forward; an unsaved one dies in it
    assert all(s.free_event >= g.num_forward for s in saved)
    unsaved = [s for s in g.storages if s.kind is StorageKind.ACTIVATION and not s.saved_by]
    assert any(s.free_event <= g.num_forward for s in unsaved)
    # every module call's early-stop point lies inside the call
    for m in g.modules:
        assert m.first_op <= m.recompute_end_op <= m.end_op


def test_meta_device_matches_cpu_without_allocating():
    import resnet

    cpu_model, cpu_args = resnet.resnet_tiny(batch_size=16)
    meta_model, meta_args = resnet.resnet_tiny(batch_size=16, device="meta")
    cpu = ckptplan.trace(cpu_model, *cpu_args)
    meta = ckptplan.trace(meta_model, *meta_args, target="cpu")  # a CPU step, planned on meta
    assert meta.device == "cpu" and meta.traced_on == "meta"
    assert meta.fingerprint == cpu.fingerprint
    assert meta.baseline_peak_bytes == cpu.baseline_peak_bytes


def test_big_model_on_meta_allocates_nothing_real():
    import gpt2

    model, args = gpt2.gpt2_small()  # meta: a CUDA step's real peak is ~10 GiB
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    graph = ckptplan.trace(model, *args)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert graph.baseline_peak_bytes > 8 * 2**30
    assert grown_kib < 1024 * 1024  # well under 1 GiB of process memory


@pytest.mark.parametrize("name", ["gpt2", "resnet"])
def test_fake_tensor_mode_matches_cpu(traced, name):
    _, _, cpu = traced(name)
    with FakeTensorMode():
        fake_model, fake_args = MODELS[name]()
        fake = ckptplan.trace(fake_model, *fake_args, target="cpu")
    assert fake.traced_on == "fake" and fake.fingerprint == cpu.fingerprint
    assert fake.baseline_peak_bytes == cpu.baseline_peak_bytes


def test_optimizer_state_is_fixed_memory(traced):
    model, args, graph = traced("llama")
    with_adam = ckptplan.trace(model, *args, optimizer="adamw")
    assert with_adam.optimizer_state_bytes == 2 * graph.param_bytes
    assert with_adam.baseline_peak_bytes == graph.baseline_peak_bytes + 2 * graph.param_bytes
    with pytest.raises(ckptplan.InputError, match="unknown optimizer"):
        ckptplan.trace(model, *args, optimizer="lion")
    model.zero_grad(set_to_none=True)


def test_bad_inputs_are_input_errors():
    with pytest.raises(ckptplan.InputError, match="nn.Module"):
        ckptplan.trace(lambda x: x, torch.ones(2))
    frozen = nn.Linear(4, 4).requires_grad_(False)
    with pytest.raises(ckptplan.InputError, match="does not require grad"):
        ckptplan.trace(frozen, torch.ones(2, 4))
