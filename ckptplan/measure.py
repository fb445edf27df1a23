"""Ground truth for one real training step: peak memory and FLOPs, measured in *separate* steps.

FlopCounterMode active during a checkpointed step keeps recomputed tensors alive (it roughly doubles
the peak of full per-block checkpointing on a small Llama), so memory is never measured with it on.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any, Callable

import torch
from torch import nn

from ._compat import SDPA_COUNTS_GQA, check_torch

check_torch("measure")  # before the imports below, so a missing one is named with the others

from torch.distributed._tools.mem_tracker import MemTracker  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from .autocast import parse_autocast  # noqa: E402
from .flops import op_flops  # noqa: E402
from .trace import default_loss  # noqa: E402


class _NoModules:
    """Stands in for MemTracker's ModTracker, which measure_peak does not need (it reads the total only).

    ModTracker learns when a module's backward ends from a ``register_multi_grad_hook`` on the module's
    inputs, which holds each input's gradient until all of them are computed. A module with an input whose
    gradient is complete only late in backward (the encoder output that every decoder layer of T5 and BART
    reads, T5's position bias made in the first block) then keeps the gradient of its hidden states alive
    until then: memory the step without the tracker never holds (2-5% of a small T5's and BART's peak
    at their minimum budget)."""

    parents: frozenset[str] = frozenset()
    is_bw = False

    def register_user_hooks(self, *_hooks: Any) -> None:
        pass

    def clear_user_hooks(self) -> None:
        pass

    def get_known_fqn(self, _module: nn.Module) -> None:
        return None

    def __enter__(self) -> "_NoModules":
        return self

    def __exit__(self, *_exc: object) -> None:
        pass


class _Tracker(MemTracker):
    """MemTracker that lets a compiled step run compiled, and holds no tensor of the step itself.

    Without ``ignore_compile_internals``, dynamo refuses to compile under a dispatch mode ("non-infra
    torch dispatch mode present") and silently runs the model eagerly, reporting the eager peak (and keeps
    running that code eagerly until ``torch._dynamo.reset()``). Its module tracker is left out
    (``_NoModules``): the per-module snapshots it feeds are not read here, and its hooks hold gradients."""

    def __init__(self) -> None:
        super().__init__()
        self._mod_tracker = _NoModules()  # type: ignore[assignment]  # duck-typed: the methods MemTracker calls

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True

    def skip_frozen(self, model: nn.Module) -> None:
        """MemTracker installs a gradient hook on every parameter, which torch refuses on one that does not
        require grad (a frozen embedding): mark those as hooked already. They are still counted."""
        handles = getattr(self, "_param_to_grad_hook_handles", None)
        if handles is None:
            return
        for p in model.parameters():
            if not p.requires_grad and handles.get(p) is None:
                handles[p] = (_NoHook(), _NoHook())


class _NoHook:
    """A hook handle with nothing to remove."""

    def remove(self) -> None:
        pass


class _FlopCounter(TorchDispatchMode):
    """FlopCounterMode's total with its own formulas (``flop_registry``), as a dispatch mode that lets a
    compiled step run compiled and counts the compiled graph's aten ops. FlopCounterMode itself cannot:
    its module tracker's global hooks break dynamo's tracing, and its mode makes dynamo run eagerly."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.total += op_flops(func, args, kwargs, out)
        return out


def _step(
    model: nn.Module,
    args: tuple,
    kwargs: dict,
    loss_fn: Callable[[Any], torch.Tensor] | None,
    autocast: str | torch.dtype | None = None,
) -> None:
    model.zero_grad(set_to_none=True)
    dtype = parse_autocast(autocast)
    device = next((p.device.type for p in model.parameters()), "cpu")
    region = torch.autocast(device, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with region:  # forward and loss, as a mixed-precision training loop runs them
        loss = (loss_fn or default_loss)(model(*args, **kwargs))
    loss.backward()


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def measure_peak(model: nn.Module, *args: Any, loss_fn=None, autocast=None, **kwargs: Any) -> int:
    """Peak bytes of one step as MemTracker sees it (CPU, meta and fake tensors) or CUDA's allocator.
    ``autocast`` ("bf16", "fp16"): forward and loss run under ``torch.autocast`` with that dtype."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        _step(model, args, kwargs, loss_fn, autocast)
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated())
    tracker = _Tracker()
    # MemTracker counts only storages it sees created, and those registered here: without the step's
    # tensor arguments it would miss the inputs (the images of a vision model), which a GPU's allocator
    # counts like any other memory and the trace counts too.
    tracker.skip_frozen(model)
    tracker.track_external(model, *_tensors((args, kwargs)))
    with tracker:
        _step(model, args, kwargs, loss_fn, autocast)
    peak = tracker.get_tracker_snapshot("peak")
    return int(max((snap["Total"] for snap in peak.values()), default=0))


def measure_flops(model: nn.Module, *args: Any, loss_fn=None, autocast=None, **kwargs: Any) -> int:
    """Total FLOPs of one step (forward, recomputation and backward) by FlopCounterMode.

    A compiled model (``torch.compile``) is counted by the same formulas in a mode that keeps it compiled;
    so is every model on a torch whose FlopCounterMode refuses grouped-query attention (2.11), with
    ``op_flops`` counting it as later releases do.
    """
    if not SDPA_COUNTS_GQA or any(isinstance(m, torch._dynamo.eval_frame.OptimizedModule) for m in model.modules()):
        counter = _FlopCounter()
        with counter:
            _step(model, args, kwargs, loss_fn, autocast)
        return counter.total
    with FlopCounterMode(display=False) as flops:
        _step(model, args, kwargs, loss_fn, autocast)
    return int(flops.get_total_flops())


def measure_step_ns(model: nn.Module, *args: Any, steps: int = 3, loss_fn=None, autocast=None, **kwargs: Any) -> int:
    """Median wall time of ``steps`` training steps (forward, loss, backward) after one warm-up step, in ns.
    CUDA work is waited for at the end of each step."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    cuda = any(p.device.type == "cuda" for p in model.parameters())
    times = []
    for i in range(steps + 1):
        started = time.perf_counter_ns()
        _step(model, args, kwargs, loss_fn, autocast)
        if cuda:
            torch.cuda.synchronize()
        if i:  # the first step warms caches and allocators up
            times.append(time.perf_counter_ns() - started)
    return int(statistics.median(times))
