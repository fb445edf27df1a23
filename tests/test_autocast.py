"""Autocast on a plan's step: CUDA's autocast stood in for on meta tensors, torch's own on real ones."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import ckptplan
from ckptplan.autocast import CUDA_POLICY, FP32, FP32_SET_OPT_DTYPE, LOWER, PROMOTE, Autocast
from ckptplan.errors import InputError, PlanMismatch
from ckptplan.kernels import CudaKernels
from ckptplan.target import parse_gpu
from examples import gpt2

from .conftest import solve_at

# Ops of AutocastCPU's lower-precision list (autocast_mode.cpp) that the mechanics test uses.
CPU_SUBSET = {"linear": LOWER, "matmul": LOWER, "bmm": LOWER, "mm": LOWER, "addmm": LOWER}


class _Log(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        first = out[0] if isinstance(out, (tuple, list)) else out
        if isinstance(first, torch.Tensor):
            self.ops.append((str(func), str(first.dtype), tuple(first.shape)))
        return out


class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16, bias=False)
        self.w = nn.Parameter(torch.randn(16, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.a(x))
        h = self.b(h) @ self.w  # a parameter cast once, an activation every time
        h = torch.bmm(h.view(2, 4, 16), h.view(2, 16, 4)).reshape(8, 4)
        h = self.a(torch.cat([h, h, h, h], dim=1))  # reused weights come from the cast cache
        return torch.mm(h, self.w)


def _ops(model: nn.Module, x: torch.Tensor, mode: TorchDispatchMode | None) -> list[tuple[str, str, tuple]]:
    log = _Log()
    with torch.autocast("cpu", dtype=torch.bfloat16), log:
        with mode if mode is not None else torch.autocast("cpu", enabled=True):
            model(x).float().sum()
    return log.ops


def test_emulated_casts_match_torchs_own_autocast_op_for_op() -> None:
    """The same template serves every autocast device: CPU's real autocast on real tensors and the
    emulation on meta tensors make the same casts, in the same order, with the same cache."""
    torch.manual_seed(0)
    real = _Mixed()
    x = torch.randn(8, 16)
    want = _ops(real, x, None)
    meta = _Mixed().to("meta")
    kernels = CudaKernels(parse_gpu("h100"))
    kernels.autocast = Autocast("cpu", policy=CPU_SUBSET)
    got = _ops(meta, x.to("meta"), kernels)
    assert sum(op == "aten._to_copy.default" for op, _, _ in want) == 6
    assert got == want


def test_cuda_policy_is_the_installed_torchs() -> None:
    header = Path(torch.__file__).parent / "include" / "ATen" / "autocast_mode.h"
    if not header.exists():
        pytest.skip("this torch ships without its C++ headers")
    text = header.read_text()
    want: dict[str, str] = {}
    for macro, policy in (
        ("AT_FORALL_LOWER_PRECISION_FP", LOWER),
        ("AT_FORALL_FP32", FP32),
        ("AT_FORALL_FP32_SET_OPT_DTYPE", FP32_SET_OPT_DTYPE),
        ("AT_FORALL_PROMOTE", PROMOTE),
    ):
        start = text.index(f"#define {macro}(_)")
        block = text[start : text.index("\n\n", start)]
        for name in re.findall(r"_\((\w+)", block):
            want[name] = policy
    listed = {k: v for k, v in CUDA_POLICY.items() if k not in ("cudnn_convolution", "cudnn_convolution_transpose")}
    assert listed == want


def _gpt2_meta(seq_len: int = 128) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    return gpt2.gpt2_tiny(device="meta", seq_len=seq_len)


def test_bf16_autocast_trace_saves_half_the_bytes_and_runs_flash() -> None:
    model, (x, y) = _gpt2_meta()
    fp32 = ckptplan.trace(model, x, y)
    bf16 = ckptplan.trace(model, x, y, autocast="bf16")
    assert bf16.autocast == "bfloat16" and fp32.autocast == ""
    assert fp32.sdpa_backends == ("efficient",)  # flash needs half precision
    assert bf16.sdpa_backends == ("flash",)
    names = [op.name for op in bf16.ops]
    assert "aten._to_copy.default" in names and "aten._to_copy.default" not in [op.name for op in fp32.ops]
    mm = [op for op in bf16.ops if op.name == "aten.addmm.default" and op.module.startswith("transformer.h.0")]
    assert mm and all(op.outputs[0].dtype == "bfloat16" for op in mm)
    norms = [op for op in bf16.ops if op.name == "aten.native_layer_norm.default"]
    assert norms and all(op.outputs[0].dtype == "float32" for op in norms)  # layer_norm is on the fp32 list
    # a weight's cast is made once per step however often it is used: no parameter cast twice
    casts = [op for op in bf16.ops if op.name == "aten._to_copy.default"]
    params = {sid for sid, s in enumerate(bf16.storages) if s.kind.value == "param"}
    cast_params = [op.inputs[0] for op in casts if op.inputs and op.inputs[0] in params]
    assert cast_params and len(cast_params) == len(set(cast_params))
    plan = solve_at(bf16, 0.7)
    assert plan.autocast == "bfloat16" and plan.predicted_peak_bytes <= plan.budget_bytes
    assert "autocast: bfloat16" in plan.to_yaml() or 'autocast: "bfloat16"' in plan.to_yaml()
    assert "autocast" not in solve_at(fp32, 0.7).to_yaml()


def test_plan_file_keeps_the_autocast_dtype(tmp_path: Path) -> None:
    model, (x, y) = _gpt2_meta(64)
    plan = solve_at(ckptplan.trace(model, x, y, autocast="fp16"), 0.7)
    assert ckptplan.load_plan(plan.save(tmp_path / "p.yaml")).autocast == "float16"
    edited = tmp_path / "edited.yaml"
    edited.write_text((tmp_path / "p.yaml").read_text().replace('"float16"', '"int8"'))
    with pytest.raises(InputError, match="autocast"):
        ckptplan.load_plan(edited)


def test_autocast_disabled_region_inside_the_model_runs_float32() -> None:
    class Rotary(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cuda", enabled=False):  # as Hugging Face's rotary embeddings do
                inner = x.float() @ x.float().T
            return self.lin(x).sum() + inner.sum()

    model = Rotary().to("meta")
    g = ckptplan.trace(model, torch.empty(4, 8, device="meta"), autocast="bf16", loss_fn=lambda out: out)
    mm = [op for op in g.ops if op.name == "aten.mm.default"]
    assert [op.outputs[0].dtype for op in mm] == ["float32"]
    assert any(op.name == "aten.addmm.default" and op.outputs[0].dtype == "bfloat16" for op in g.ops)


def test_cross_entropy_under_autocast_is_log_softmax_then_float32_nll() -> None:
    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(16, 32)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(self.lin(x), y)

    model = Head().to("meta")
    g = ckptplan.trace(
        model,
        torch.empty(8, 16, device="meta"),
        torch.empty(8, dtype=torch.long, device="meta"),
        autocast="bf16",
        loss_fn=lambda out: out,
    )
    tail = [(op.name, op.outputs[0].dtype) for op in g.ops if op.outputs][-3:]
    assert tail == [
        ("aten._log_softmax.default", "bfloat16"),
        ("aten._to_copy.default", "float32"),
        ("aten.nll_loss_forward.default", "float32"),
    ]


def test_multihead_attention_inside_python_functions_takes_cuda_attention() -> None:
    """nn.MultiheadAttention calls scaled_dot_product_attention from inside a Python function."""
    layer = nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, batch_first=True, dropout=0.0).to("meta")
    x = torch.empty(2, 128, 64, device="meta")
    g = ckptplan.trace(layer, x, autocast="bf16")
    assert g.sdpa_backends in (("cudnn",), ("flash",))
    assert not any(len(t.shape) == 4 and t.shape[-2:] == (128, 128) for op in g.ops for t in op.outputs)


def test_autocast_needs_a_cuda_target_on_meta_and_a_known_dtype() -> None:
    model, (x, y) = _gpt2_meta(64)
    with pytest.raises(InputError, match="target"):
        ckptplan.trace(model, x, y, target="cpu", autocast="bf16")
    with pytest.raises(InputError, match="bf16 or fp16"):
        ckptplan.trace(model, x, y, autocast="int8")


def test_cpu_step_under_autocast_trains_bitwise_and_refuses_a_step_without_it() -> None:
    model, (x, y) = gpt2.gpt2_tiny(device="cpu", seq_len=64, dropout=0.0, n_layer=2)
    graph = ckptplan.trace(model, x, y, autocast="bf16")
    plan = solve_at(graph, 0.6)
    assert plan.regions, "the budget must make the plan checkpoint something"

    def grads(apply_plan: bool) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        handle = ckptplan.apply(model, plan) if apply_plan else None
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(x, y)
            loss.backward()
        finally:
            if handle is not None:
                handle.remove()
        return [p.grad.clone() for p in model.parameters()]

    want, got = grads(False), grads(True)
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    with ckptplan.apply(model, plan):
        with pytest.raises(PlanMismatch, match="autocast"):
            model(x, y)


def test_cli_solves_and_verifies_a_step_under_autocast(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ckptplan.cli import app

    runner = CliRunner(env={"COLUMNS": "300"})
    spec = f"{Path(gpt2.__file__)}:gpt2_tiny"
    args = ["-m", spec, "-a", "seq_len=64", "-a", "n_layer=2", "-a", "dropout=0.0"]
    out = tmp_path / "plan.yaml"
    solved = runner.invoke(
        app, ["solve", *args, "-b", "90%", "--autocast", "bf16", "-o", str(out), "--json", "--time-limit", "10"]
    )
    assert solved.exit_code == 0, solved.output
    assert ckptplan.load_plan(out).autocast == "bfloat16"
    verified = runner.invoke(app, ["verify", str(out), *args, "--json"])
    assert verified.exit_code == 0, verified.output
    assert '"fits": true' in verified.stdout
    bad = runner.invoke(app, ["solve", *args, "-b", "70%", "--autocast", "fp8", "-o", str(tmp_path / "x.yaml")])
    assert bad.exit_code == 2 and "bf16 or fp16" in bad.output


def test_nll_loss_runs_in_float32_under_autocast() -> None:
    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(16, 32)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            logits = self.lin(x)  # bf16 under autocast
            return F.nll_loss(logits - logits.detach().amax(-1, keepdim=True), y)

    model = Head().to("meta")
    g = ckptplan.trace(
        model,
        torch.empty(8, 16, device="meta"),
        torch.empty(8, dtype=torch.long, device="meta"),
        autocast="bf16",
        loss_fn=lambda out: out,
    )
    tail = [(op.name, op.outputs[0].dtype) for op in g.ops if op.outputs][-2:]
    assert tail == [("aten._to_copy.default", "float32"), ("aten.nll_loss_forward.default", "float32")]
