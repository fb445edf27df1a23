"""The example models in examples/ build, train one step, run on meta, and have the right size."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    """Import examples/<name>.py as a plain module (examples/ is not a package)."""
    module_name = f"ckptplan_examples_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def factory(spec: str):
    module, name = spec.split(":")
    return getattr(load_example(module), name)


def unpack(built):
    """A factory returns (model, args) or (model, args, kwargs)."""
    if len(built) == 3:
        model, args, kwargs = built
    else:
        (model, args), kwargs = built, {}
    return model, tuple(args), dict(kwargs)


TINY = ["gpt2:gpt2_tiny", "llama:llama_tiny", "resnet:resnet_tiny", "unet:unet_tiny"]


@pytest.mark.parametrize("spec", TINY)
def test_tiny_step_on_cpu(spec):
    model, args, kwargs = unpack(factory(spec)(device="cpu", seed=0))
    assert model.training
    assert all(t.device.type == "cpu" for t in args)
    loss = model(*args, **kwargs)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{spec}: {name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{spec}: {name} has a non-finite gradient"


@pytest.mark.parametrize("spec", TINY)
def test_tiny_step_on_meta(spec):
    model, args, kwargs = unpack(factory(spec)(device="meta", seed=0))
    assert all(p.device.type == "meta" for p in model.parameters())
    assert all(b.device.type == "meta" for b in model.buffers())
    assert all(t.device.type == "meta" for t in args)
    loss = model(*args, **kwargs)
    assert loss.device.type == "meta" and loss.dim() == 0
    loss.backward()
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in model.parameters())


@pytest.mark.parametrize("spec", TINY)
def test_same_seed_same_loss(spec):
    def eval_loss(seed):
        model, args, kwargs = unpack(factory(spec)(device="cpu", seed=seed))
        model.eval()  # dropout off; BatchNorm uses its fresh running stats (0 mean, 1 var)
        with torch.no_grad():
            return model(*args, **kwargs)

    assert torch.equal(eval_loss(0), eval_loss(0))
    assert not torch.equal(eval_loss(0), eval_loss(1))


@pytest.mark.parametrize("spec", ["llama:llama_tiny", "resnet:resnet_tiny", "unet:unet_tiny"])
def test_train_mode_step_is_deterministic_without_dropout(spec):
    """These models have no dropout, so even a train-mode step (BN batch stats) repeats exactly."""

    def step(seed):
        model, args, kwargs = unpack(factory(spec)(device="cpu", seed=seed))
        loss = model(*args, **kwargs)
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters()]

    (l0, g0), (l1, g1) = step(0), step(0)
    assert torch.equal(l0, l1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))


def test_gpt2_weights_are_tied():
    model, _, _ = unpack(factory("gpt2:gpt2_tiny")())
    assert model.lm_head.weight is model.transformer.wte.weight


def test_batchnorm_running_stats_update_in_train_mode():
    model, args, kwargs = unpack(factory("resnet:resnet_tiny")())
    bn = model.layer1[0].bn1
    before = bn.running_mean.clone()
    model(*args, **kwargs)
    assert bn.num_batches_tracked.item() == 1
    assert not torch.equal(before, bn.running_mean)


@pytest.mark.parametrize("blocks, widths", [((1,), (8,)), ((2, 2, 2, 2), (8, 16, 32, 64))])
def test_resnet_stage_count_follows_blocks(blocks, widths):
    model, args, kwargs = unpack(factory("resnet:resnet_tiny")(blocks=blocks, widths=widths))
    names = {name for name, _ in model.named_children()}
    assert {f"layer{i + 1}" for i in range(len(blocks))} <= names
    assert f"layer{len(blocks) + 1}" not in names
    model(*args, **kwargs).backward()


BIG = [
    # (factory, exact parameter count)
    ("gpt2:gpt2_small", 124_439_808),  # nanoGPT's GPT-2 small (124M) with tied lm_head
    ("llama:llama_7b", 6_738_415_616),  # Llama-2 7B
    ("resnet:resnet18ish", 11_689_512),  # torchvision resnet18
    ("resnet:resnet50ish", 25_557_032),  # torchvision resnet50
]


@pytest.mark.parametrize("spec, n_params", BIG)
def test_big_factories_on_meta(spec, n_params):
    model, args, kwargs = unpack(factory(spec)())  # meta is the default device: nothing is allocated
    assert all(p.device.type == "meta" for p in model.parameters())
    assert all(t.device.type == "meta" for t in args)
    assert model.training
    assert sum(p.numel() for p in model.parameters()) == n_params


@pytest.mark.parametrize("spec", [spec for spec, _ in BIG])
def test_big_factories_step_on_meta(spec):
    """A full-size step at the default batch runs on meta in well under a second."""
    model, args, kwargs = unpack(factory(spec)())
    assert all(b.device.type == "meta" for b in model.buffers())
    loss = model(*args, **kwargs)
    assert loss.device.type == "meta" and loss.dim() == 0
    loss.backward()


def test_llama_7b_takes_dtype_and_layer_count():
    model, args, _ = unpack(factory("llama:llama_7b")(n_layer=2, seq_len=256, dtype=torch.bfloat16))
    assert len(model.layers) == 2
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert args[0].shape == (1, 256) and args[0].dtype == torch.long
    per_layer = (4 * 4096 * 4096) + 3 * 4096 * 11008 + 2 * 4096
    assert sum(p.numel() for p in model.parameters()) == 2 * per_layer + 2 * 32000 * 4096 + 4096
    model(*args).backward()


def test_llama_gqa_matches_enable_gqa():
    """The explicit repeat_interleave of k, v equals SDPA's built-in grouped-query attention."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 16, 32, generator=g)
    k, v = torch.randn(2, 2, 16, 32, generator=g), torch.randn(2, 2, 16, 32, generator=g)
    ours = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    builtin = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.allclose(ours, builtin, atol=1e-6)


def test_tiny_losses_start_near_uniform():
    """Random init predicts roughly uniformly: loss ~ log(classes), a sanity check on the heads."""
    for spec, classes in [("gpt2:gpt2_tiny", 512), ("llama:llama_tiny", 512)]:
        model, args, kwargs = unpack(factory(spec)())
        model.eval()
        with torch.no_grad():
            loss = model(*args, **kwargs).item()
        assert abs(loss - math.log(classes)) < 0.5, (spec, loss)
