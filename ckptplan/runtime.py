"""Apply a Plan to a live model: ``handle = apply(model, plan)``; ``handle.remove()`` undoes it.

Each checkpointed region's ``forward`` runs under ``torch.utils.checkpoint(use_reentrant=False)``,
preserving the RNG state so that dropout masks are identical when recomputed. A region that saves some
of its ops runs it under a pair of dispatch modes (selective checkpointing, as
``create_selective_checkpoint_contexts`` does it, but keyed by op position): the forward caches the
outputs the plan saves, the recomputation hands them back and reruns the rest. A region that saves
nothing runs as plain ``torch.utils.checkpoint``, with no dispatch mode: the modes call Python for every
op in forward and again in the recomputation, which on small ops costs more than the recomputation itself
(costmodel.py charges it).

Safety:
* ``apply`` refuses a model whose parameters, buffers or module types differ from the traced one.
* Every op the forward mode sees is compared with the plan (op, module, output shapes), keyed by its
  position inside the region, which extra dispatch modes (FlopCounterMode, MemTracker, a profiler)
  do not change. The first difference raises ``PlanMismatch`` during forward, before any gradient.
  Regions that save ops are checked at every step; a region that saves nothing is checked at its first
  step and then runs plain (``apply(..., strict=True)`` checks it at every step). A later change of path
  in such a region cannot change gradients (it recomputes everything, and torch's checkpoint refuses a
  recomputation whose saved tensors differ); it can only move the memory away from the prediction.
* Buffers a region writes in forward (BatchNorm statistics) are restored after its recomputation,
  so they are updated exactly once per step.

Accounting: in a selective region, the recomputation's dispatch mode (which only runs in backward) adds
up the FLOPs of the ops it actually reruns, with ``torch.utils.flop_counter``'s
formulas. A plain region's recomputation adds the plan's FLOPs for it (the ops up to the early stop),
counted when the recomputation runs; at another of a multi-shape plan's input shapes (its op rows are the
largest shape's) such a region keeps the dispatch modes, which count them. A rematerialization's rerun
counts its recipe's FLOPs (rematerialize.py). ``handle.stats`` is updated at the end of every backward, and
one INFO line is logged per step.

A plan's rematerializations (regions of type "rematerialize") run in ``rematerialize.py``; while torch's
checkpoint starts or ends a region here, they wait (``Counter.suspended``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from .autocast import dtype_name
from .checkpointing import Counter, RegionRuntime
from .errors import PlanMismatch
from .graph import parse_path
from .modes import eval_modules, kv_cache_off, kv_cache_restore
from .plan import Plan
from .rematerialize import Rematerializer
from .signature import model_signature, num_parameters
from .units import format_bytes, format_flops

log = logging.getLogger("ckptplan")


@dataclass
class StepStats:
    """What the last training step paid, updated at the end of each backward."""

    forward_flops: int = 0  # the traced forward (FlopCounterMode formulas)
    extra_forward_flops: int = 0  # FLOPs recomputed during the last backward
    recomputed_regions: int = 0  # regions recomputed (and tensors rematerialized) during the last backward
    steps: int = 0  # backward passes seen
    total_extra_forward_flops: int = 0

    @property
    def extra_forward_fraction(self) -> float:
        return self.extra_forward_flops / self.forward_flops if self.forward_flops else 0.0


# NOTE [ Copying a planned model ]
# ``copy.deepcopy(model)`` and ``torch.save(model)`` copy the model's ``__dict__``: its hooks and the
# ``forward`` a region or the rematerializer installs, and through them the Handle, its regions and its
# Rematerializer. Every hook is a bound method or a ``functools.partial`` of one (never a closure, which
# deepcopy shares and pickle refuses), so the copy's hooks are bound to the copy's own runtime objects,
# whose modules are the copy's: the copy carries a working plan of its own (``Handle.of(copy)``). What
# belongs to a step in flight (op objects, which do not pickle, the last step's autograd hook, registered
# rematerialization targets) is left out by ``__getstate__``; between steps it is empty or rebuilt.
class Handle:
    """A plan applied to a model. ``stats`` is updated after each backward; ``remove()`` undoes it.

    A deep copy (or ``torch.save``/``torch.load``) of the model carries a copy of the plan, applied to the
    copy; ``Handle.of(copy)`` returns its handle (NOTE [ Copying a planned model ]).
    """

    def __init__(self, model: nn.Module, plan: Plan, *, strict: bool = False) -> None:
        self.model, self.plan = model, plan
        self.stats = StepStats(forward_flops=plan.forward_flops)
        self._counter = Counter()
        self._regions = [
            RegionRuntime(model.get_submodule(r.path), r, self._counter, strict=strict, one_shape=len(plan.shapes) == 1)
            for r in plan.regions
            if not r.remat
        ]
        remats = [r for r in plan.regions if r.remat]
        try:
            self._remat = Rematerializer(model, remats, self._counter) if remats else None
        except BaseException:  # a recipe the plan file got wrong: leave the model as it was
            for r in self._regions:
                r.restore()
            raise
        self._hooks = [
            # first of the model's pre-hooks: the rematerializations read ``aside``
            model.register_forward_pre_hook(self._before_step, with_kwargs=True, prepend=True),
            model.register_forward_hook(self._after_forward),
        ]

        self._grad_hook: Any = None
        self._warned_aside = False
        self.removed = False
        self._cache_was_on = kv_cache_off(model)  # Hugging Face's use_cache, off while the plan is applied
        # Handle.of(model); a deep copy of the model carries its own copy. torch types Module attributes
        # as Tensor | Module
        model._ckptplan_applied = self  # type: ignore[assignment]

    @staticmethod
    def of(model: nn.Module) -> "Handle | None":
        """The handle of the plan applied to ``model``, or None: how to remove the plan a copy carries."""
        handle = model.__dict__.get("_ckptplan_applied")
        return handle if isinstance(handle, Handle) else None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_grad_hook": None}  # the last step's autograd graph is not copied

    def _before_step(self, _m: nn.Module, args: Any, kwargs: Any) -> None:
        if not torch.is_grad_enabled():
            return
        modes = eval_modules(self.model)
        self._counter.aside = modes != tuple(self.plan.eval_modules)
        if self._counter.aside:  # model.eval() with gradients on, or other modules frozen: run unplanned
            self._counter.flops = self._counter.regions = 0
            if not self._warned_aside:
                log.warning(
                    "ckptplan: the model runs with %s in eval mode, the plan was made for %s: this "
                    "step runs without the plan (trace and solve in this mode to plan it)",
                    _describe_modules(modes, "no module"),
                    _describe_modules(tuple(self.plan.eval_modules), "a training step"),
                )
                self._warned_aside = True
            return
        self._check_autocast()
        got = [
            f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor)
        ]
        if tuple(got) not in {tuple(x) for x in self.plan.shapes}:
            made_for = " or ".join(str(list(x)) for x in self.plan.shapes)
            raise PlanMismatch(
                f"input {got} is not a shape the plan was made for ({made_for}); "
                "trace and solve a plan for this input shape (or list it with --seq-len)"
            )
        self._counter.flops = self._counter.regions = 0
        # the op rows are the largest shape's: at another listed shape, ops and modules are compared
        self._counter.check_shapes = tuple(got) == tuple(self.plan.inputs)

    def _check_autocast(self) -> None:
        """The step runs under the autocast the plan was made for (casts are ops of the plan)."""
        device = self.plan.device
        on = torch.is_autocast_enabled(device)
        running = dtype_name(torch.get_autocast_dtype(device) if on else None)
        if running != self.plan.autocast:
            planned = (
                f"under torch.autocast({device!r}, dtype=torch.{self.plan.autocast})"
                if self.plan.autocast
                else "without autocast"
            )
            now = f"under torch.autocast({device!r}, dtype=torch.{running})" if running else "without autocast"
            fix = f"--autocast {'bf16' if running == 'bfloat16' else 'fp16'}" if running else "no --autocast"
            raise PlanMismatch(
                f"the plan was made for a step {planned}, this step runs {now}: run the step as "
                f"planned, or trace and solve again with {fix}"
            )

    def _after_forward(self, _m: nn.Module, _a: Any, output: Any) -> None:
        outs = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
        if self._grad_hook is not None:
            self._grad_hook.remove()
            self._grad_hook = None
        if outs:
            self._grad_hook = torch.autograd.graph.register_multi_grad_hook(outs, self._on_backward, mode="any")

    def _on_backward(self, _grad: Any) -> None:
        torch.autograd.Variable._execution_engine.queue_callback(self._end_step)

    def _end_step(self) -> None:
        s = self.stats
        s.steps += 1
        s.extra_forward_flops = self._counter.flops
        s.recomputed_regions = self._counter.regions
        s.total_extra_forward_flops += self._counter.flops
        if log.isEnabledFor(logging.INFO):
            plan = self.plan
            measured = ""
            if plan.device == "cuda" and torch.cuda.is_available() and torch.cuda.is_initialized():
                measured = f", CUDA max_memory_allocated so far {format_bytes(torch.cuda.max_memory_allocated())}"
            log.info(
                "ckptplan step %d: recomputed %d regions, %s extra forward (+%.1f%% of forward, estimated "
                "%.1f ms); plan peak %s of %s budget, %s below no checkpointing%s",
                s.steps,
                s.recomputed_regions,
                format_flops(s.extra_forward_flops),
                100 * s.extra_forward_fraction,
                plan.extra_cost_ns / 1e6,
                format_bytes(plan.predicted_peak_bytes),
                format_bytes(plan.budget_bytes),
                format_bytes(max(0, plan.baseline_peak_bytes - plan.predicted_peak_bytes)),
                measured,
            )

    def remove(self) -> None:
        """Put the model back to plain behaviour."""
        if self.removed:
            return
        if self._remat is not None:  # first: it wraps the root's forward, which may be a region's
            self._remat.remove()
        for r in self._regions:
            r.restore()
        for h in self._hooks:
            h.remove()
        if self._grad_hook is not None:
            self._grad_hook.remove()
        kv_cache_restore(self.model, self._cache_was_on)
        self.model.__dict__.pop("_ckptplan_applied", None)
        self.removed = True

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def apply(model: nn.Module, plan: Plan, *, strict: bool = False) -> Handle:
    """Apply ``plan`` to ``model`` in place. Raises PlanMismatch, saying what differs, for another model.

    ``strict``: check the op sequence of every region at every step, including regions that save nothing
    (which are otherwise checked at their first step, then run as plain checkpoint)."""
    check_model(model, plan)
    return Handle(model, plan, strict=strict)


def _describe_modules(paths: tuple[str, ...], none: str) -> str:
    if not paths:
        return none
    if "" in paths:
        return "the whole model"
    return ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")


def _device_type(model: nn.Module) -> str | None:
    t: torch.Tensor | None = next(iter(model.parameters()), None)
    if t is None:
        t = next(iter(model.buffers()), None)
    return None if t is None else t.device.type


def check_model(model: nn.Module, plan: Plan) -> None:
    if getattr(model, "_ckptplan_applied", False):
        raise PlanMismatch("a plan is already applied to this model; call handle.remove() first")
    device = _device_type(model)
    if device is not None and device != "meta" and plan.device != device:
        made_for = f"{plan.device} ({plan.gpu})" if plan.gpu else plan.device
        raise PlanMismatch(
            f"this plan is for a {made_for} step, but the model is on {device}: its kernels, saved tensors and "
            f"memory differ. Plan for this device: `ckptplan solve --target {device} ...` (a {device} model "
            f"traced as it is, or built on the meta device with --target {device})"
        )
    for r in plan.regions:
        path = parse_path(r.path)[0] if r.remat else r.path
        try:
            sub = model.get_submodule(path)
        except AttributeError:
            raise PlanMismatch(
                f"the plan {'rematerializes inside' if r.remat else 'checkpoints'} module '{path}', "
                f"which this model does not have; the plan was made for {plan.model}"
            ) from None
        if not r.remat and type(sub).__name__ != r.type_name:
            raise PlanMismatch(
                f"module '{r.path}' is a {type(sub).__name__} but the plan expects a "
                f"{r.type_name}; the plan was made for another model"
            )
    sig = model_signature(model)
    if sig != plan.signature:
        raise PlanMismatch(
            f"the model's parameters, buffers or module types differ from the traced {plan.model}: "
            f"model has {num_parameters(model):,} parameters (signature {sig}), the plan was made for "
            f"{plan.num_parameters:,} (signature {plan.signature}); trace and solve this model"
        )
