"""``torch.autocast`` for a device whose tensors the trace does not have, stood in for on meta tensors.

Mixed precision on a GPU is ``torch.autocast("cuda", dtype=torch.bfloat16)`` around the forward and the
loss. Autocast is a dispatch key that only CUDA tensors carry, so a trace on meta or fake tensors runs
every op in float32: other ops (no casts), other dtypes, twice the bytes of what a GPU step saves.
``Autocast`` reproduces, for ops called through Python, what the ``AutocastCUDA`` kernels do:

NOTE [ autocast policies ]
aten/src/ATen/autocast_mode.h (``AT_FORALL_LOWER_PRECISION_FP``, ``AT_FORALL_FP32``,
``AT_FORALL_FP32_SET_OPT_DTYPE``, ``AT_FORALL_PROMOTE``) lists the ops and ``WrapFunction_`` their policy:
lower-precision ops cast every floating argument (not float64) to the autocast dtype; fp32 ops cast them
to float32; fp32_set_opt_dtype ops get ``dtype=float32`` when their first tensor is floating and no
dtype was given; promote ops cast all to the widest floating type among them. Each cast is
``cached_cast``: ``tensor.to(dtype)`` (aten ``_to_copy``), and a float32 leaf that requires grad (a
parameter) cast to the lower dtype is cast once per autocast region and kept in a cache until the
region ends. Casts run in the order C++ evaluates the wrapper's arguments, which for GCC-built wheels
(torch's Linux builds) is last argument first: ``linear(x, w, b)`` casts ``b``, ``w``, then ``x``
(the same template serves ``AutocastCPU``; tests/test_autocast.py checks order and cache against it).

Ops that decompose in C++ are seen whole: ``cross_entropy_loss`` is stood in for by its decomposition
(``log_softmax`` in the logits' dtype, then ``nll_loss`` in float32), which is what autocast makes of it.
A ``torch.autocast("cuda", enabled=False)`` region inside the model turns the emulation off, as on a GPU.
"""

from __future__ import annotations

from typing import TypeGuard

import torch
from torch import Tensor

from .errors import InputError

LOWER = "lower_precision_fp"
FP32 = "fp32"
FP32_SET_OPT_DTYPE = "fp32_set_opt_dtype"
PROMOTE = "promote"

# The CUDA lists of autocast_mode.h (torch 2.13), by the name an op has in Python. Overloads share the
# policy of their op except pow, whose three overloads all are fp32.
CUDA_POLICY: dict[str, str] = {
    **dict.fromkeys(
        (
            "_convolution",
            "conv1d",
            "conv2d",
            "conv3d",
            "conv_tbc",
            "conv_transpose1d",
            "conv_transpose2d",
            "conv_transpose3d",
            "convolution",
            "prelu",
            "addmm",
            "addmv",
            "addr",
            "matmul",
            "einsum",
            "mm",
            "mv",
            "linalg_vecdot",
            "linear",
            "addbmm",
            "baddbmm",
            "bmm",
            "chain_matmul",
            "linalg_multi_dot",
            "_thnn_fused_lstm_cell",
            "_thnn_fused_gru_cell",
            "lstm_cell",
            "gru_cell",
            "rnn_tanh_cell",
            "rnn_relu_cell",
            "_scaled_dot_product_flash_attention",
            "scaled_dot_product_attention",
            "cudnn_convolution",
            "cudnn_convolution_transpose",
        ),
        LOWER,
    ),
    **dict.fromkeys(
        (
            "acos",
            "asin",
            "cosh",
            "erfinv",
            "exp",
            "expm1",
            "log",
            "log10",
            "log2",
            "log1p",
            "reciprocal",
            "rsqrt",
            "sinh",
            "tan",
            "pow",
            "softplus",
            "layer_norm",
            "native_layer_norm",
            "rms_norm",
            "group_norm",
            "frobenius_norm",
            "nuclear_norm",
            "cosine_similarity",
            "poisson_nll_loss",
            "cosine_embedding_loss",
            "nll_loss",
            "nll_loss2d",
            "hinge_embedding_loss",
            "kl_div",
            "l1_loss",
            "smooth_l1_loss",
            "huber_loss",
            "mse_loss",
            "margin_ranking_loss",
            "multilabel_margin_loss",
            "soft_margin_loss",
            "triplet_margin_loss",
            "multi_margin_loss",
            "binary_cross_entropy_with_logits",
            "dist",
            "pdist",
            "cdist",
            "renorm",
            "logsumexp",
            "upsample_nearest1d",
            "_upsample_nearest_exact1d",
            "upsample_nearest2d",
            "_upsample_nearest_exact2d",
            "upsample_nearest3d",
            "_upsample_nearest_exact3d",
            "upsample_linear1d",
            "upsample_bilinear2d",
            "_upsample_bilinear2d_aa",
            "upsample_trilinear3d",
            "upsample_bicubic2d",
            "_upsample_bicubic2d_aa",
        ),
        FP32,
    ),
    **dict.fromkeys(
        ("prod", "softmax", "log_softmax", "cumprod", "cumsum", "linalg_vector_norm", "linalg_matrix_norm", "sum"),
        FP32_SET_OPT_DTYPE,
    ),
    **dict.fromkeys(
        (
            "addcdiv",
            "addcmul",
            "atan2",
            "bilinear",
            "cross",
            "dot",
            "vdot",
            "grid_sampler",
            "index_put",
            "tensordot",
            "scatter_add",
        ),
        PROMOTE,
    ),
}

# C++ composites a Python call reaches whole, whose policy op takes the same tensors: F.nll_loss calls
# nll_loss_nd, which calls nll_loss (or nll_loss2d for 4-D input) on them.
CUDA_POLICY_COMPOSITES = {"nll_loss_nd": FP32}

_DUNDER = {"__matmul__": "matmul", "__pow__": "pow", "__rpow__": "pow"}


def op_name(func: object) -> str:
    """The aten name of a builtin torch function (``torch._C._nn.linear`` -> ``linear``)."""
    name = getattr(func, "__name__", "")
    return _DUNDER.get(name, name)


def _eligible(t: object) -> TypeGuard[Tensor]:
    # is_autocast_eligible (the tensor is on the autocast's device: every tensor of a stood-in trace) and
    # cached_cast's exclusion of float64
    return isinstance(t, Tensor) and t.is_floating_point() and t.dtype is not torch.float64


class Autocast:
    """The casts ``torch.autocast(device_type, dtype)`` makes around an op (see NOTE [ autocast policies ]).

    Active while ``torch.is_autocast_enabled(device_type)``: the trace sets that flag for the forward and
    the loss (it is thread-local state, which a CPU build of torch keeps for "cuda" too)."""

    def __init__(self, device_type: str = "cuda", policy: dict[str, str] | None = None) -> None:
        self.device_type = device_type
        self.policy = {**CUDA_POLICY, **CUDA_POLICY_COMPOSITES} if policy is None else policy
        self._cache: dict[int, tuple[Tensor, Tensor]] = {}

    def active(self) -> torch.dtype | None:
        """The autocast dtype when autocast is on for this device, else None."""
        if not torch.is_autocast_enabled(self.device_type):
            return None
        return torch.get_autocast_dtype(self.device_type)

    def clear(self) -> None:
        """The autocast region ended: drop the cached casts (``clear_autocast_cache``)."""
        self._cache.clear()

    def cast_args(self, name: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The arguments the op ``name`` runs with under autocast (unchanged when autocast is off)."""
        policy = self.policy.get(name)
        lower = self.active() if policy is not None else None  # most ops have no policy: no TLS read
        if lower is None or policy is None:
            return args, kwargs
        if policy == FP32_SET_OPT_DTYPE:
            first = next((a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), None)
            if _eligible(first) and kwargs.get("dtype") is None and not _dtype_given(args):
                kwargs = {**kwargs, "dtype": torch.float32}
            return args, kwargs
        if policy == LOWER:
            to = lower
        elif policy == FP32:
            to = torch.float32
        else:  # promote: the widest floating type of the eligible arguments
            dtypes = [t.dtype for t in _tensors((*args, *kwargs.values())) if _eligible(t)]
            to = lower
            for d in dtypes:
                to = torch.promote_types(to, d)
        # the wrapper's arguments are evaluated last first (see the NOTE); keywords follow the positionals
        keys = list(kwargs)
        values = [*args, *(kwargs[k] for k in keys)]
        cast = [self._cast_any(v, to, lower) for v in reversed(values)][::-1]
        return tuple(cast[: len(args)]), dict(zip(keys, cast[len(args) :]))

    def _cast_any(self, value: object, to: torch.dtype, lower: torch.dtype) -> object:
        if isinstance(value, (list, tuple)) and any(isinstance(v, Tensor) for v in value):
            return type(value)(self._cast_any(v, to, lower) for v in value)
        if not _eligible(value) or value.dtype == to:
            return value
        return self._cast(value, to, lower)

    def _cast(self, t: Tensor, to: torch.dtype, lower: torch.dtype) -> Tensor:
        cacheable = (
            to == lower
            and t.dtype is torch.float32
            and t.requires_grad
            and t.is_leaf
            and not t._is_view()
            and torch.is_autocast_cache_enabled()
        )
        if cacheable:
            hit = self._cache.get(id(t))
            if hit is not None and hit[0] is t:
                return hit[1]
        out = t.to(to)
        if cacheable:
            self._cache[id(t)] = (t, out)
        return out


def _dtype_given(args: tuple) -> bool:
    """Whether a positional argument already is the op's dtype (``x.softmax(-1, torch.float32)``)."""
    return any(isinstance(a, torch.dtype) for a in args)


def _tensors(values: tuple) -> list[Tensor]:
    out: list[Tensor] = []
    for v in values:
        if isinstance(v, Tensor):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out.extend(x for x in v if isinstance(x, Tensor))
    return out


_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
}


def parse_autocast(value: str | torch.dtype | None) -> torch.dtype | None:
    """The autocast dtype a step runs under: "bf16" / "fp16" (or a torch dtype); None or "" for none."""
    if value is None or value == "" or value == "none":
        return None
    if isinstance(value, torch.dtype) and value in (torch.bfloat16, torch.float16):
        return value
    found = _DTYPES.get(str(value).lower().removeprefix("torch."))
    if found is None:
        raise InputError(
            f"autocast dtype {value!r} is not one autocast runs: give bf16 or fp16 "
            f"(torch.autocast's dtype), or leave it out for a float32 step"
        )
    return found


def dtype_name(dtype: torch.dtype | None) -> str:
    """How a plan file names an autocast dtype ("bfloat16"; "" for none)."""
    return "" if dtype is None else str(dtype).removeprefix("torch.")
