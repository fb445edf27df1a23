"""Planning for a CUDA step on meta tensors: the kernels CUDA picks, the allocator's blocks, the device
check at apply, and the cost profile passed into solve."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ckptplan
from ckptplan import costmodel
from ckptplan.errors import InputError, PlanMismatch
from ckptplan.kernels import CudaKernels, choose_sdpa
from ckptplan.target import GPUS, SdpaBackend, Target, cuda_block_bytes, parse_gpu, reserved_estimate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import gpt2  # examples/ is not a package
import llama
import resnet
import vit

ROOT = Path(__file__).resolve().parent.parent

aten = torch.ops.aten
FUSED = (
    "aten._scaled_dot_product_flash_attention.default",
    "aten._scaled_dot_product_cudnn_attention.default",
    "aten._scaled_dot_product_efficient_attention.default",
)


def _bf16(model: nn.Module, args: tuple) -> tuple[nn.Module, tuple]:
    model = model.to(torch.bfloat16)
    return model, tuple(a.to(torch.bfloat16) if a.is_floating_point() else a for a in args)


ZOO = {
    "gpt2": lambda: gpt2.gpt2_tiny(device="meta"),
    "llama": lambda: llama.llama_tiny(device="meta"),
    "vit": lambda: vit.vit_tiny(device="meta"),
    "resnet": lambda: resnet.resnet_tiny(device="meta"),
}


def _meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


# ---- the backend torch picks ---------------------------------------------------------------------------


def _qkv(b=2, h=8, t=128, d=64, dtype=torch.bfloat16, kv_heads=None, s=None):
    q = torch.empty(b, h, t, d, dtype=dtype, device="meta")
    k = torch.empty(b, kv_heads or h, s or t, d, dtype=dtype, device="meta")
    return q, k, k.clone()


@pytest.mark.parametrize(
    "gpu, kw, dropout, mask, causal, want",
    [
        ("h100", {}, 0.0, None, True, SdpaBackend.CUDNN),  # cuDNN first on sm90
        ("h100", {}, 0.1, None, True, SdpaBackend.FLASH),  # cuDNN's dropout comes in sixteenths
        ("h100", {}, 0.125, None, True, SdpaBackend.CUDNN),
        ("a100", {}, 0.0, None, True, SdpaBackend.FLASH),
        ("a100", {"dtype": torch.float32}, 0.0, None, True, SdpaBackend.EFFICIENT),  # flash is half only
        ("a100", {}, 0.0, "mask", False, SdpaBackend.EFFICIENT),  # flash takes no mask
        ("a100", {"s": 64}, 0.0, None, True, SdpaBackend.EFFICIENT),  # causal flash needs L == S
        ("a100", {"d": 320}, 0.0, None, False, SdpaBackend.EFFICIENT),  # flash: head dim <= 256
        ("a100", {"kv_heads": 2}, 0.0, None, True, SdpaBackend.MATH),  # grouped without enable_gqa
        ("t4", {"dtype": torch.float16}, 0.0, None, True, SdpaBackend.EFFICIENT),  # no flash before sm80
        ("t4", {}, 0.0, None, True, SdpaBackend.MATH),  # no bf16 before sm80
        ("l4", {"d": 200}, 0.0, None, False, SdpaBackend.EFFICIENT),  # sm89 flash backward: head dim <= 192
    ],
)
def test_backend_choice(gpu, kw, dropout, mask, causal, want):
    q, k, v = _qkv(**kw)
    m = torch.empty(q.shape[2], k.shape[2], dtype=torch.bool, device="meta") if mask else None
    assert choose_sdpa(parse_gpu(gpu), q, k, v, m, dropout, causal, False, True) is want


def test_grouped_query_attention_goes_to_flash_with_enable_gqa():
    q, k, v = _qkv(kv_heads=2)
    assert choose_sdpa(parse_gpu("a100"), q, k, v, None, 0.0, True, True, True) is SdpaBackend.FLASH


def test_gpu_names_and_capabilities():
    assert parse_gpu("H100").capability == (9, 0)
    assert parse_gpu("sm86").capability == (8, 6) and parse_gpu("8.9").capability == (8, 9)
    with pytest.raises(InputError, match="unknown GPU"):
        parse_gpu("h1000")
    with pytest.raises(InputError, match="memory of GPU"):
        parse_gpu("9.0").card_budget()
    assert 0 < GPUS["h100"].card_budget() < GPUS["h100"].memory_bytes


@pytest.mark.parametrize("backend", ["flash", "cudnn", "efficient"])
def test_fused_kernels_save_what_their_meta_functions_give(backend):
    """Through CudaKernels the step holds the kernel's outputs exactly as torch's meta function for the CUDA
    kernel gives them (output and logsumexp), and backward's gradients have the inputs' shapes."""
    q, k, v = (t.requires_grad_() for t in _qkv(t=96, d=64))
    with CudaKernels(parse_gpu("h100"), SdpaBackend(backend)):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    fn = {
        "flash": lambda: aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=0.125),
        "cudnn": lambda: aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False),
        "efficient": lambda: aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, True),
    }
    ref = fn[backend]()
    assert out.shape == ref[0].shape and out.dtype == ref[0].dtype
    assert type(out.grad_fn).__name__ == type(ref[0].grad_fn).__name__
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape


def test_flash_pads_an_odd_head_dim_and_slices_back():
    q, k, v = _qkv(d=36)
    with CudaKernels(parse_gpu("a100")) as kernels:
        out = F.scaled_dot_product_attention(q, k, v)
    assert kernels.chosen == [SdpaBackend.FLASH] and out.shape == q.shape


# ---- traces of the zoo -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zoo_traces():
    out = {}
    for name, build in ZOO.items():
        model, args = build()
        model, args = _bf16(model, args)
        out[name] = ckptplan.trace(model, *args, gpu="a100")
    return out


@pytest.mark.parametrize("name", list(ZOO))
def test_cuda_trace_of_the_zoo(zoo_traces, name):
    g = zoo_traces[name]
    assert g.device == "cuda" and g.gpu == "a100" and g.traced_on == "meta"
    names = [op.name for op in g.ops]
    assert not any("bernoulli" in n for n in names), "dropout must be CUDA's fused kernel"
    for op in g.ops:
        if op.name == "aten.native_dropout.default":
            assert op.outputs[1].dtype == "bool" and op.random
    # every storage is a caching-allocator block
    assert all(s.nbytes % 512 == 0 for s in g.storages)
    assert g.extra_fixed_bytes == parse_gpu("a100").cublas_workspace_bytes
    attention = [op for op in g.ops if op.name in FUSED]
    if name in ("gpt2", "llama", "vit"):
        assert attention and g.sdpa_backends == ("flash",)
        assert "aten._safe_softmax.default" not in names
        for op in attention:
            out, lse = op.outputs[:2]
            b, h, t, _ = out.shape
            assert lse.shape == (b, h, t) and lse.dtype == "float32"
            # no [B, H, L, L] score matrix anywhere in the step
            assert not any(x.shape == (b, h, t, t) for o in g.ops for x in o.outputs)
    else:
        assert not attention


def test_batch_norm_takes_cudnn():
    x = torch.empty(4, 8, 16, 16, device="meta", requires_grad=True)
    net = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).to("meta")
    g = ckptplan.trace(net, x)
    assert "aten.cudnn_batch_norm.default" in {op.name for op in g.ops}
    g = ckptplan.trace(net, x, target="cpu")
    assert "aten.native_batch_norm.default" in {op.name for op in g.ops} and g.device == "cpu"


@pytest.mark.parametrize("name", ["gpt2", "llama", "vit", "resnet"])
def test_cpu_target_on_meta_is_the_cpu_step(name):
    """A plan for the CPU made on meta tensors has exactly the ops, shapes and peak of the real CPU step
    (the CPU's flash attention where the CPU picks it)."""
    meta_model, meta_args = ZOO[name]()
    cpu_model, cpu_args = {
        "gpt2": lambda: gpt2.gpt2_tiny(),
        "llama": lambda: llama.llama_tiny(),
        "vit": lambda: vit.vit_tiny(),
        "resnet": lambda: resnet.resnet_tiny(),
    }[name]()
    meta = ckptplan.trace(meta_model, *meta_args, target="cpu")
    cpu = ckptplan.trace(cpu_model, *cpu_args)
    assert [op.name for op in meta.ops] == [op.name for op in cpu.ops]
    assert meta.fingerprint == cpu.fingerprint and meta.baseline_peak_bytes == cpu.baseline_peak_bytes


def test_target_defaults_and_refusals():
    model, args = gpt2.gpt2_tiny(device="cpu")
    g = ckptplan.trace(model, *args)
    assert g.device == "cpu" and g.gpu == "" and g.extra_fixed_bytes == 0
    with pytest.raises(InputError, match="meta device"):
        ckptplan.trace(model, *args, target="cuda")
    with pytest.raises(InputError, match="cuda target only"):
        ckptplan.trace(model, *args, gpu="h100")
    with pytest.raises(InputError, match="unknown target"):
        ckptplan.trace(model, *args, target="tpu")
    with pytest.raises(InputError, match="cuda target"):
        ckptplan.trace(model, *args, sdpa="flash")


def test_allocator_rounding():
    assert [cuda_block_bytes(n) for n in (0, 1, 512, 513, 4096)] == [0, 512, 512, 1024, 4096]
    mib = 1 << 20
    # two small blocks share a 2 MiB segment; a 5 MiB block takes a 20 MiB one; 11 MiB rounds to 12
    assert reserved_estimate([512, 512]) == 2 * mib
    assert reserved_estimate([5 * mib]) == 20 * mib
    assert reserved_estimate([11 * mib]) == 12 * mib


# ---- plans: device recorded, refused elsewhere -----------------------------------------------------------


def test_cuda_plan_records_the_gpu_and_is_refused_on_cpu(tmp_path):
    meta_model, args = gpt2.gpt2_tiny(device="meta", batch_size=8, seq_len=256)
    graph = ckptplan.trace(meta_model, *args, gpu="l4")
    plan = ckptplan.solve(graph, "75%", time_limit_s=20)
    assert plan.regions
    path = plan.save(tmp_path / "p.yaml")
    loaded = ckptplan.load_plan(path)
    assert loaded.device == "cuda" and loaded.gpu == "l4" and loaded == plan
    cpu_model, _ = gpt2.gpt2_tiny(device="cpu")
    with pytest.raises(PlanMismatch, match="--target cpu"):
        ckptplan.apply(cpu_model, loaded)


# ---- the cost profile is passed into solve ---------------------------------------------------------------


def test_price_reproduces_the_trace_and_profile_changes_the_estimate(tmp_path):
    model, args = gpt2.gpt2_tiny(device="cpu")
    graph = ckptplan.trace(model, *args)
    again = costmodel.price(graph, costmodel.profile_from_dict(costmodel.profile_to_dict(costmodel.CPU)))
    assert [op.cost_ns for op in again.ops] == [op.cost_ns for op in graph.ops]
    slow = costmodel.profile_to_dict(costmodel.CPU) | {"name": "slow", "bytes_per_s": 1e9, "flops_per_s": 1e9}
    f = tmp_path / "slow.yaml"
    import yaml

    f.write_text(yaml.safe_dump(slow))
    base = ckptplan.solve(graph, "85%", time_limit_s=20)
    priced = ckptplan.solve(graph, "85%", time_limit_s=20, profile=f)
    assert priced.extra_cost_ns > base.extra_cost_ns
    assert graph.ops[0].cost_ns == again.ops[0].cost_ns  # the traced graph itself is not re-priced


@pytest.mark.parametrize(
    "content, match",
    [
        ("name: x\nbogus: 1\n", "unknown profile fields"),
        ("[1, 2]", "mapping"),
        ("name: x\nflops_per_s: .nan\n", "finite"),
        ("{{{", "not YAML"),
    ],
)
def test_bad_profile_files(tmp_path, content, match):
    f = tmp_path / "p.yaml"
    f.write_text(content)
    model, args = gpt2.gpt2_tiny(device="cpu")
    graph = ckptplan.trace(model, *args)
    with pytest.raises(InputError, match=match):
        ckptplan.solve(graph, "85%", time_limit_s=5, profile=f)


def test_card_budget_is_below_the_card():
    h = GPUS["h100"]
    assert math.isclose(h.card_budget() / h.memory_bytes, 0.94, abs_tol=0.02)
    assert Target("cuda") is Target.CUDA


class _Normed(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.norm, self.down = torch.nn.Linear(16, 32), torch.nn.RMSNorm(32), torch.nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.norm(self.up(x))).sum()


def test_rms_norm_takes_cudas_fused_kernel_on_meta_and_the_decomposition_for_cpu():
    """CUDA runs rms_norm as one kernel saving (input, weight, rstd); the CPU decomposes it."""
    model = _Normed().to("meta")
    x = torch.empty(8, 4, 16, device="meta")
    cuda = ckptplan.trace(model, x)
    fused = [op for op in cuda.ops if op.name == "aten._fused_rms_norm.default"]
    assert len(fused) == 1 and [t.shape for t in fused[0].outputs] == [(8, 4, 32), (8, 4, 1)]
    assert "aten.rsqrt.default" not in {op.name for op in cuda.ops}
    saved = [s for s in cuda.storages if "norm" in s.saved_by]
    assert {s.producer for s in saved} >= {fused[0].index}  # rstd is kept for backward
    real = _Normed()
    cpu_real = ckptplan.trace(real, torch.randn(8, 4, 16))
    cpu_meta = ckptplan.trace(model, x, target="cpu")
    assert [op.name for op in cpu_meta.ops] == [op.name for op in cpu_real.ops]
    assert "aten._fused_rms_norm.default" not in {op.name for op in cpu_real.ops}
    half = ckptplan.trace(model, x, autocast="bf16")  # autocast runs rms_norm in float32
    (op,) = [op for op in half.ops if op.name == "aten._fused_rms_norm.default"]
    assert [t.dtype for t in op.outputs] == ["float32", "float32"]
