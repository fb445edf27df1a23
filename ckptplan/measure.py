"""Ground truth for one real training step: peak memory and FLOPs, measured in *separate* steps.

FlopCounterMode active during a checkpointed step keeps recomputed tensors alive (it roughly doubles
the peak of full per-block checkpointing on a small Llama), so memory is never measured with it on.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils.flop_counter import FlopCounterMode

from .trace import default_loss


def _step(model: nn.Module, args: tuple, kwargs: dict, loss_fn: Callable[[Any], torch.Tensor] | None) -> None:
    model.zero_grad(set_to_none=True)
    loss = (loss_fn or default_loss)(model(*args, **kwargs))
    loss.backward()


def measure_peak(model: nn.Module, *args: Any, loss_fn=None, **kwargs: Any) -> int:  # noqa: ANN001
    """Peak bytes of one step as MemTracker sees it (CPU, meta and fake tensors) or CUDA's allocator."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        _step(model, args, kwargs, loss_fn)
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated())
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        _step(model, args, kwargs, loss_fn)
    peak = tracker.get_tracker_snapshot("peak")
    return int(max((snap["Total"] for snap in peak.values()), default=0))


def measure_flops(model: nn.Module, *args: Any, loss_fn=None, **kwargs: Any) -> int:  # noqa: ANN001
    """Total FLOPs of one step (forward, recomputation and backward) by FlopCounterMode."""
    with FlopCounterMode(display=False) as counter:
        _step(model, args, kwargs, loss_fn)
    return int(counter.get_total_flops())
