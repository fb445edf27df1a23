"""FLOPs of one aten op, exactly as ``torch.utils.flop_counter.FlopCounterMode`` counts them."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import flop_registry, sdpa_flop_count

aten = torch.ops.aten


def op_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> int:
    """FlopCounterMode's count for one call (0 for ops without a formula, as it does)."""
    formula = flop_registry.get(func._overloadpacket)
    if formula is None:
        return 0
    return int(formula(*args, **kwargs, out_val=out))


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in x.shape)


def cost_flops(func: Any, args: tuple, kwargs: dict, out: Any, flops: int) -> int:
    """FLOPs for the time estimate: FlopCounterMode's count, plus the CPU attention kernel it misses.

    ``_scaled_dot_product_flash_attention_for_cpu`` has no formula in torch 2.13, so FlopCounterMode
    reports 0 for attention on CPU. Recomputing it is not free, so the cost model charges it the
    formula torch uses for the other attention kernels.
    """
    if func is aten._scaled_dot_product_flash_attention_for_cpu.default and flops == 0:
        q, k, v = args[:3]
        return int(sdpa_flop_count(_shape(q), _shape(k), _shape(v)))
    return flops
