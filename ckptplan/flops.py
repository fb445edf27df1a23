"""FLOPs of one aten op, exactly as ``torch.utils.flop_counter.FlopCounterMode`` counts them."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import flop_registry, sdpa_flop_count

from . import _compat

aten = torch.ops.aten

# attention ops with a FLOP formula -> the position of their query in args (key and value follow;
# all three (batch, heads, seq, dim))
_ATTENTION_QUERY = {
    aten._scaled_dot_product_efficient_attention: 0,
    aten._scaled_dot_product_flash_attention: 0,
    aten._scaled_dot_product_cudnn_attention: 0,
    aten._scaled_dot_product_efficient_attention_backward: 1,
    aten._scaled_dot_product_flash_attention_backward: 1,
    aten._scaled_dot_product_cudnn_attention_backward: 1,
}


def op_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> int:
    """FlopCounterMode's count for one call (0 for ops without a formula, as it does)."""
    packet = func._overloadpacket
    formula = flop_registry.get(packet)
    if formula is None:
        return 0
    if not _compat.SDPA_COUNTS_GQA and packet in _ATTENTION_QUERY:
        args = _repeat_kv_heads(args, _ATTENTION_QUERY[packet])
    return int(formula(*args, **kwargs, out_val=out))


def _repeat_kv_heads(args: tuple, q: int) -> tuple:
    """``args`` with key and value as shapes with the query's heads, as torch >= 2.12 counts grouped-query
    attention; torch 2.11's formulas refuse fewer key/value heads. The formulas take a shape where a
    tensor would be, so no tensor is made."""
    query, key, value = args[q : q + 3]
    heads = query.shape[1]
    if key.shape[1] == heads or heads % key.shape[1]:
        return args
    key_shape = (key.shape[0], heads, *key.shape[2:])
    value_shape = (value.shape[0], heads, *value.shape[2:])
    return (*args[: q + 1], torch.Size(key_shape), torch.Size(value_shape), *args[q + 3 :])


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in getattr(x, "shape", x))


def cost_flops(func: Any, args: tuple, kwargs: dict, out: Any, flops: int) -> int:
    """FLOPs for the time estimate: FlopCounterMode's count, plus the CPU attention kernel it misses.

    ``_scaled_dot_product_flash_attention_for_cpu`` has no formula in torch 2.13, so FlopCounterMode
    reports 0 for attention on CPU. Recomputing it is not free, so the cost model charges it the
    formula torch uses for the other attention kernels.
    """
    if func is aten._scaled_dot_product_flash_attention_for_cpu.default and flops == 0:
        q, k, v = _repeat_kv_heads(args, 0)[:3]
        return int(sdpa_flop_count(_shape(q), _shape(k), _shape(v)))
    return flops
