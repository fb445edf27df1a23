"""The kernels CUDA would run in a step, stood in for on meta tensors.

A plan made on a laptop (meta or fake tensors) is a plan for a GPU step. Most aten ops are dispatched
alike on every device, but a few composite ops choose their kernel by device, and what that kernel
saves for backward is what the plan must count. ``CudaKernels`` is a ``TorchFunctionMode`` that, while
the trace runs on meta or fake tensors, takes those decisions as CUDA's dispatcher takes them and calls
the CUDA kernel's own aten op, whose meta function gives its outputs and whose autograd formula saves
what the CUDA kernel saves:

* ``scaled_dot_product_attention``: the backend torch picks for the GPU (``select_sdp_backend`` in
  aten/src/ATen/native/transformers/cuda/sdp_utils.cpp, reproduced by ``choose_sdpa``): cuDNN, flash or
  memory-efficient attention keep the output and a logsumexp, never the [B, H, L, S] matrix; the math
  fallback is left to the meta decomposition.
* ``dropout``: ``aten.native_dropout`` (one fused kernel, a bool mask) where CUDA fuses it
  (``is_fused_kernel_acceptable`` in aten/src/ATen/native/Dropout.cpp), not the float mask of the
  CPU decomposition.
* ``batch_norm``: ``aten.cudnn_batch_norm`` where ``_batch_norm_impl_index`` picks cuDNN.
* ``rms_norm``: CUDA's fused kernel (see NOTE [ fused RMSNorm on meta ]).
* ``softmax`` / ``log_softmax`` of half input to float output: one kernel (``half_to_float``).
* ``torch.autocast("cuda")``: the casts its kernels make (autocast.py), when a step is traced with
  ``autocast="bf16"`` or ``"fp16"``.

The mode sees the torch functions that Python-level functions call (``F.multi_head_attention_forward``
calls ``scaled_dot_product_attention``) on torch releases that have ``torch.overrides.redispatch_function``
(2.13 and later); on older ones only the outer call.

Not stood in for: dropout inside the math attention fallback.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .autocast import Autocast, op_name
from .target import GpuSpec, SdpaBackend

aten = torch.ops.aten


# ---- SDPA backend choice ------------------------------------------------------------------------------


def _priority(gpu: GpuSpec) -> tuple[SdpaBackend, ...]:
    """``priority_order``: cuDNN first on sm90 and sm10x (with the cuDNN >= 9.15 that CUDA 13 builds ship),
    else flash, memory-efficient, math, cuDNN."""
    major, minor = gpu.capability
    if (major == 9 and minor == 0) or major == 10:
        return SdpaBackend.CUDNN, SdpaBackend.FLASH, SdpaBackend.EFFICIENT, SdpaBackend.MATH
    return SdpaBackend.FLASH, SdpaBackend.EFFICIENT, SdpaBackend.MATH, SdpaBackend.CUDNN


def _heads_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, enable_gqa: bool) -> bool:
    """``check_batch_size_and_num_heads_dense`` for backends that support grouped-query attention."""
    if q.shape[0] != k.shape[0] or k.shape[0] != v.shape[0] or k.shape[1] != v.shape[1]:
        return False
    if q.shape[1] == k.shape[1]:
        return True
    return enable_gqa and k.shape[1] > 0 and q.shape[1] % k.shape[1] == 0


def _dense_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, ignore_singleton: bool) -> bool:
    """Four dimensions, non-empty sequences, unit stride in the last dimension."""
    if not (q.dim() == k.dim() == v.dim() == 4):
        return False
    if min(q.shape[2], k.shape[2], v.shape[2], q.shape[0], q.shape[1]) == 0:
        return False
    for t in (q, k, v):
        if t.stride(-1) != 1 and not (ignore_singleton and t.shape[-1] == 1):
            return False
    return True


def _can_cudnn(gpu: GpuSpec, q, k, v, mask, dropout_p: float, grad: bool, enable_gqa: bool) -> bool:
    major, minor = gpu.capability
    if not (8, 0) <= gpu.capability <= (12, 1) or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if torch.are_deterministic_algorithms_enabled() or dropout_p * 16.0 != math.floor(dropout_p * 16.0):
        return False
    if not _dense_ok(q, k, v, ignore_singleton=True) or not _heads_ok(q, k, v, enable_gqa):
        return False
    if max(q.shape[0], q.shape[1]) > 65535 or k.shape[2] == 1 or (dropout_p and q.shape[2] == 1):
        return False
    d_qk, d_v = q.shape[3], v.shape[3]
    hopper_or_blackwell = (major == 9 and minor == 0) or major == 10
    limit = 256 if hopper_or_blackwell else 128
    if d_qk > limit or d_v > limit or d_qk % 8 or d_v % 8:
        return False
    if grad and hopper_or_blackwell and not ((d_qk <= 128 and d_v <= 128) or (d_qk, d_v) in ((192, 128), (256, 256))):
        return False
    return mask is None or mask.dim() <= 4


def _can_flash(gpu: GpuSpec, q, k, v, mask, dropout_p: float, is_causal: bool, grad: bool, enable_gqa: bool) -> bool:
    if mask is not None or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if not _dense_ok(q, k, v, ignore_singleton=True) or not _heads_ok(q, k, v, enable_gqa):
        return False
    d = q.shape[-1]
    if not (d == k.shape[-1] == v.shape[-1] and d <= 256) or not (8, 0) <= gpu.capability <= (12, 1):
        return False
    if grad and ((8, 6) <= gpu.capability <= (8, 9) or (12, 0) <= gpu.capability <= (12, 1)):
        if not (d <= 192 or (not dropout_p and d > 224)):
            return False
    return not (is_causal and q.shape[2] != k.shape[2])


def _gemm_alignment(gpu: GpuSpec, half: bool) -> int:
    """``minimum_gemm_alignment``: 4 from sm80, 128 bits where tensor cores run (sm80+, or sm70+ in half)."""
    major = gpu.capability[0]
    mn = 4 if major >= 8 else 1
    if major >= 8 or (major >= 7 and half):
        mn = max(mn, 128 // (16 if half else 32))
    return mn


def _can_efficient(gpu: GpuSpec, q, k, v, enable_gqa: bool) -> bool:
    if not (5, 0) <= gpu.capability <= (12, 1):
        return False
    allowed = (
        (torch.float16, torch.float32, torch.bfloat16) if gpu.capability[0] >= 8 else (torch.float16, torch.float32)
    )
    if q.dtype not in allowed or not _dense_ok(q, k, v, ignore_singleton=False):
        return False
    # the memory-efficient kernel's meta backward does not reduce a grouped-query gradient: plan such a
    # call on the math path rather than with a gradient of the wrong shape
    if not _heads_ok(q, k, v, False):
        return False
    half = q.dtype in (torch.float16, torch.bfloat16)
    align = _gemm_alignment(gpu, half)
    if q.shape[-1] != k.shape[-1] or q.shape[-1] % align or v.shape[-1] % align:
        return False
    if gpu.capability[0] >= 8:
        need = align * q.element_size()
        if any((t.storage_offset() * t.element_size()) % need for t in (q, k, v) if t.numel()):
            return False
    return True


def choose_sdpa(
    gpu: GpuSpec,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    enable_gqa: bool,
    grad: bool,
) -> SdpaBackend:
    """The backend ``select_sdp_backend`` picks on ``gpu`` for these inputs (all backends enabled)."""
    for backend in _priority(gpu):
        if backend is SdpaBackend.CUDNN and _can_cudnn(gpu, q, k, v, mask, dropout_p, grad, enable_gqa):
            return backend
        if backend is SdpaBackend.FLASH and _can_flash(gpu, q, k, v, mask, dropout_p, is_causal, grad, enable_gqa):
            return backend
        if backend is SdpaBackend.EFFICIENT and _can_efficient(gpu, q, k, v, enable_gqa):
            return backend
        if backend is SdpaBackend.MATH:
            return backend
    return SdpaBackend.MATH


# ---- the CUDA kernels, on meta or fake tensors ---------------------------------------------------------


def _bool_mask_to_float(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``convert_boolean_attn_mask``: True takes part (0), False is -inf; the same three ops as torch's."""
    if mask is None or mask.dtype is not torch.bool:
        return mask
    zero = torch.scalar_tensor(0.0, dtype=dtype, device=mask.device)
    neg_inf = torch.scalar_tensor(-math.inf, dtype=dtype, layout=torch.strided, device=mask.device)
    return torch.where(mask, zero, neg_inf)


def _efficient_mask(mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``preprocess_mask``: broadcast to [B, H, L, S]; the last dimension padded to 16 and sliced back, or
    made contiguous where its strides are not multiples of 16."""
    mask = mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    s = mask.shape[-1]
    if s % 16:
        return F.pad(mask, [0, 16 - s % 16])[..., :s]
    if any(st % 16 for st in mask.stride()[:3]):
        return mask.contiguous()
    return mask


# NOTE [ fused RMSNorm on meta ]
# rms_norm (aten/src/ATen/native/layer_norm.cpp, ``rms_norm_symint``) calls ``_fused_rms_norm`` unless the
# input is channels-last or complex or the weight's dtype differs from the input's. CUDA has a kernel for it,
# whose autograd formula saves the input, the weight and ``rstd``; every other backend, meta included, runs
# its CompositeImplicitAutograd decomposition (pow, mean, rsqrt, mul, ...), which saves other tensors.
# torch refuses a meta kernel for an op with such a decomposition, so the trace calls this stand-in, whose
# fake kernel gives the CUDA kernel's outputs (``rstd``: the input's leading dims, the normalized ones kept
# as 1, in float32 for half inputs, as torch's own decomposition of the op gives it) and whose backward is
# aten's ``_fused_rms_norm_backward``; the recorder files it under aten's name (``STANDS_FOR``).
@torch.library.custom_op("ckptplan::fused_rms_norm", mutates_args=())
def _fused_rms_norm(
    input: torch.Tensor, normalized_shape: list[int], weight: torch.Tensor | None, eps: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    raise RuntimeError("ckptplan::fused_rms_norm stands in for CUDA's kernel on meta or fake tensors only")


@_fused_rms_norm.register_fake
def _fused_rms_norm_fake(input, normalized_shape, weight, eps):
    n = len(normalized_shape)
    acc = torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype
    out = torch.empty_like(input, memory_format=torch.contiguous_format)
    rstd = input.new_empty((*input.shape[: input.dim() - n], *([1] * n)), dtype=acc)
    return out, rstd


def _fused_rms_norm_setup(ctx, inputs, output) -> None:
    x, shape, weight, _ = inputs
    ctx.shape = list(shape)
    ctx.has_weight = weight is not None
    ctx.save_for_backward(x, weight, output[1])


def _fused_rms_norm_backward(ctx, grad, _grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.has_weight and ctx.needs_input_grad[2]]
    dx, dw = aten._fused_rms_norm_backward(grad, x, ctx.shape, rstd, weight, mask)
    return dx, None, dw, None


_fused_rms_norm.register_autograd(_fused_rms_norm_backward, setup_context=_fused_rms_norm_setup)

# ops the trace records under the name of the aten op they stand in for
STANDS_FOR = {"ckptplan.fused_rms_norm.default": "aten._fused_rms_norm.default"}


def _python_function(func: Any) -> bool:
    """A torch function written in Python (``F.layer_norm``, ``F.multi_head_attention_forward``): the ops
    it calls are torch functions of their own."""
    return inspect.isfunction(func) or inspect.ismethod(func)


# torch.overrides.redispatch_function (torch >= 2.13) runs a Python torch function with the mode kept
# for the functions it calls; on older releases a mode sees only the outer call.
_redispatch = getattr(torch.overrides, "redispatch_function", None)


class _KernelMode(TorchFunctionMode):
    """A mode that stands in for a device's dispatch decisions at every depth: the torch functions a
    Python-level function calls (``nn.MultiheadAttention`` calls ``scaled_dot_product_attention`` inside
    ``F.multi_head_attention_forward``) pass through the mode too."""

    _entering: tuple[Any, ...] = ()  # the Python functions being run with the mode kept, innermost last

    def _inside(self, func, types, args, kwargs):
        # A Python function whose body calls the builtin it wraps (Tensor.unflatten, torch.einsum) is
        # handed to the mode again under its own name: that second call runs as is.
        if _redispatch is None or not _python_function(func) or (self._entering and self._entering[-1] is func):
            return func(*args, **kwargs)
        self._entering = (*self._entering, func)
        try:
            with self:
                return _redispatch(func, types, args, kwargs)
        finally:
            self._entering = self._entering[:-1]


class CpuKernels(_KernelMode):
    """Runs the CPU's attention kernel where the CPU's dispatcher picks it (``select_sdp_backend_cpp``:
    flash attention for 4-D inputs without dropout), so that a CPU plan made on meta tensors holds the ops
    a real CPU step runs."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self._sdpa(*args, **kwargs)
        return self._inside(func, types, args, kwargs)

    @staticmethod
    def _sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        flash = (
            dropout_p == 0.0
            and _dense_ok(q, k, v, ignore_singleton=True)
            and _heads_ok(q, k, v, enable_gqa)
            and q.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
        )
        if not flash:
            return F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attn_mask,
                dropout_p=dropout_p,
                is_causal=is_causal,
                scale=scale,
                enable_gqa=enable_gqa,
            )
        mask = _bool_mask_to_float(attn_mask, q.dtype)
        return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, attn_mask=mask, scale=scale)[0]


class CudaKernels(_KernelMode):
    """Runs the CUDA kernels' aten ops where CUDA's dispatcher would pick them (see the module docstring),
    and CUDA's autocast where ``torch.is_autocast_enabled("cuda")`` (ckptplan/autocast.py). Records each
    attention backend chosen in ``chosen``."""

    def __init__(self, gpu: GpuSpec, sdpa: SdpaBackend = SdpaBackend.AUTO) -> None:
        super().__init__()
        self.gpu = gpu
        self.sdpa = sdpa
        self.chosen: list[SdpaBackend] = []
        self.autocast = Autocast("cuda")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.dropout or func is torch.dropout:
            return self._dropout(func, args, kwargs)
        if func is F.batch_norm:
            return self._batch_norm(func, args, kwargs)
        name = op_name(func)
        if _python_function(func) and name not in self.autocast.policy:
            return self._inside(func, types, args, kwargs)
        if name == "cross_entropy_loss" and self.autocast.active() is not None:
            return self._cross_entropy(func, args, kwargs)
        args, kwargs = self.autocast.cast_args(name, tuple(args), kwargs)
        if func is F.scaled_dot_product_attention:
            return self._sdpa(*args, **kwargs)
        if name in ("softmax", "log_softmax"):
            return self._softmax(func, name, args, kwargs)
        if name == "rms_norm":
            return self._rms_norm(func, args, kwargs)
        return func(*args, **kwargs)

    @staticmethod
    def _rms_norm(func, args, kwargs):
        # rms_norm(input, normalized_shape, weight=None, eps=None): see NOTE [ fused RMSNorm on meta ]
        b = {"weight": None, "eps": None} | dict(zip(("input", "normalized_shape", "weight", "eps"), args)) | kwargs
        x, w = b["input"], b["weight"]
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d if x.dim() == 5 else None
        channels_last = fmt is not None and not x.is_contiguous() and x.is_contiguous(memory_format=fmt)
        if x.is_complex() or channels_last or (w is not None and w.dtype != x.dtype):
            return func(*args, **kwargs)
        shape = [b["normalized_shape"]] if isinstance(b["normalized_shape"], int) else list(b["normalized_shape"])
        eps = None if b["eps"] is None else float(b["eps"])
        return _fused_rms_norm(x, shape, w, eps)[0]

    def _cross_entropy(self, func, args, kwargs):
        # cross_entropy_loss(input, target, weight, reduction, ignore_index, label_smoothing) decomposes in
        # C++ (LossNLL.cpp) into log_softmax in the input's dtype and nll_loss_nd, whose nll_loss autocast
        # runs in float32; class-index targets without label smoothing only, else the op runs whole
        names = ("input", "target", "weight", "reduction", "ignore_index", "label_smoothing")
        defaults = {"weight": None, "reduction": 1, "ignore_index": -100, "label_smoothing": 0.0}
        b = defaults | dict(zip(names, args)) | kwargs
        x, target = b["input"], b["target"]
        if (
            not isinstance(x, torch.Tensor)
            or not x.is_floating_point()
            or target.is_floating_point()
            or b["label_smoothing"]
            or x.dim() not in (1, 2, 4)
        ):
            return func(*args, **kwargs)
        logp = torch.log_softmax(x, 0 if x.dim() == 1 else 1, dtype=x.dtype)
        weight, logp = self.autocast.cast_args("nll_loss", (b["weight"], logp), {})[0]
        reduction = {0: "none", 1: "mean", 2: "sum"}[int(b["reduction"])]  # torch's Reduction enum
        return F.nll_loss(logp, target, weight, ignore_index=b["ignore_index"], reduction=reduction)

    @staticmethod
    def _softmax(func, name, args, kwargs):
        # softmax(input, dim, dtype): CUDA takes half input to float output in one kernel
        # (half_to_float, aten/src/ATen/native/SoftMax.cpp); elsewhere the input is converted first
        x = args[0]
        dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
        dtype = kwargs.get("dtype", args[2] if len(args) > 2 else None)
        if isinstance(x, torch.Tensor) and x.dtype is torch.float16 and dtype is torch.float32 and isinstance(dim, int):
            kernel = aten._softmax if name == "softmax" else aten._log_softmax
            return kernel(x, dim, True)
        return func(*args, **kwargs)

    # scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
    #                              scale=None, enable_gqa=False)
    def _sdpa(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        backend = (
            self.sdpa
            if self.sdpa is not SdpaBackend.AUTO
            else choose_sdpa(self.gpu, q, k, v, attn_mask, dropout_p, is_causal, enable_gqa, grad)
        )
        self.chosen.append(backend)
        if backend is SdpaBackend.MATH:
            return F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attn_mask,
                dropout_p=dropout_p,
                is_causal=is_causal,
                scale=scale,
                enable_gqa=enable_gqa,
            )
        if backend is SdpaBackend.CUDNN:
            mask = _bool_mask_to_float(attn_mask, q.dtype)
            return aten._scaled_dot_product_cudnn_attention(
                q, k, v, mask, grad, dropout_p, is_causal, False, scale=scale
            )[0]
        if backend is SdpaBackend.FLASH:
            d = q.shape[-1]
            scale = 1.0 / math.sqrt(d) if scale is None else scale
            if d % 8:  # pad_last_dim<8>, and post_process_flash_output slices the output back
                q, k, v = (F.pad(t, [0, 8 - d % 8]) for t in (q, k, v))
            out = aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, False, scale=scale)[0]
            return out[..., :d] if d % 8 else out
        mask = _bool_mask_to_float(attn_mask, q.dtype)
        if mask is not None:
            mask = _efficient_mask(mask, q, k)
        return aten._scaled_dot_product_efficient_attention(q, k, v, mask, grad, dropout_p, is_causal, scale=scale)[0]

    @staticmethod
    def _dropout(func, args, kwargs):
        # F.dropout(input, p=0.5, training=True, inplace=False); torch.dropout(input, p, train)
        names = ("input", "p", "training", "inplace") if func is F.dropout else ("input", "p", "train")
        bound = dict(zip(names, args)) | kwargs
        x, p = bound["input"], float(bound.get("p", 0.5))
        train = bool(bound.get("training", bound.get("train", True)))
        if train and 0.0 < p < 1.0 and x.numel() > 0 and not bound.get("inplace", False):
            return aten.native_dropout(x, p, True)[0]
        return func(*args, **kwargs)

    @staticmethod
    def _batch_norm(func, args, kwargs):
        # F.batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
        #              momentum=0.1, eps=1e-5)
        names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
        defaults = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
        b = defaults | dict(zip(names, args)) | kwargs
        x, w, bias, rm, rv = b["input"], b["weight"], b["bias"], b["running_mean"], b["running_var"]
        stats = rm is not None and rv is not None
        # _batch_norm_impl_index's use_cudnn (cuDNN's minimum epsilon is 1e-5)
        if (
            x.dtype is not torch.float64
            and w is not None
            and bias is not None
            and x.dim() >= 3
            and (stats or (rm is None and rv is None and b["training"]))
            and (x.dtype is not torch.float16 or w.dtype is torch.float32)
            and ((x.shape[0] <= 880801 and b["training"]) or (x.shape[0] <= 65535 and not b["training"]))
            and b["eps"] >= 1e-5
            and torch.backends.cudnn.enabled
            and x.numel() < 2**31 - 1
        ):
            if b["training"] and stats:
                F._verify_batch_size(x.size())
            return aten.cudnn_batch_norm(
                x, w, bias, rm, rv, bool(b["training"]), float(b["momentum"] or 0.0), float(b["eps"])
            )[0]
        return func(*args, **kwargs)
