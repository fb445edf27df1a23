"""Checkpointed regions at run time: a region's ``forward`` under ``torch.utils.checkpoint``.

A region that saves some of its ops runs under a pair of dispatch modes (selective checkpointing, as
``create_selective_checkpoint_contexts`` does it, but keyed by op position): the forward caches the
outputs the plan saves, the recomputation hands them back and reruns the rest. A region that saves
nothing runs as plain ``torch.utils.checkpoint``, with no dispatch mode, once its ops have been checked
(runtime.py says when). ``Counter`` is what the step in flight has paid; runtime.py's Handle owns it.
"""

from __future__ import annotations

from functools import partial
from types import MethodType
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.checkpoint import SAC_IGNORED_OPS, _VersionWrapper, checkpoint

from ._compat import detach_cached
from .errors import PlanMismatch
from .flops import op_flops
from .graph import Forced
from .plan import Decision, RegionPlan
from .rematerialize import shapes_equal

# CUDA's fused attention kernels (kernels.py): interchangeable where the plan names one of them
FUSED_ATTENTION = frozenset(
    {
        "aten._scaled_dot_product_flash_attention.default",
        "aten._scaled_dot_product_efficient_attention.default",
        "aten._scaled_dot_product_cudnn_attention.default",
    }
)


class Counter:
    """What the step in flight has paid, and whether its input is the shape the plan's rows show."""

    def __init__(self) -> None:
        self.flops = 0
        self.regions = 0
        self.check_shapes = True
        self.suspended = 0  # > 0 while torch's checkpoint starts or ends a region: rematerialize.py waits
        self.aside = False  # this step runs in another mode than the traced one: the plan steps aside


_MISSING = object()


class _SelectiveForward(TorchDispatchMode):
    """Selective checkpointing's forward: runs each op, checks it against the plan, caches what it saves.

    PyTorch's own pair of modes (``create_selective_checkpoint_contexts``) calls a policy with a fresh
    context object for every op, keys its cache by op and call count and asks whether it is compiling on
    every op. A plan knows each op's position in its region, so these cache by position: the same cached
    values (detached, their version checked when taken back), less Python per op (costmodel.py charges
    what is left).
    """

    def __init__(self, region: "RegionRuntime", cache: dict[int, Any]) -> None:
        super().__init__()
        self.region, self.cache = region, cache

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in SAC_IGNORED_OPS:
            return out
        pos = self.region.check(func, out)
        if pos < self.region.varies and self.region.saves[pos]:
            self.cache[pos] = tree_map(lambda x: _VersionWrapper(detach_cached(x)), out)
        return out


class _SelectiveRecompute(TorchDispatchMode):
    """The recomputation in backward: hands back the cached outputs, reruns the others and counts their FLOPs.

    It also checks that the recomputation replays the forward's op sequence. A region whose forward
    reads state that the forward itself changed (a Hugging Face KV cache when ``use_cache=True``, a
    global flag) reruns other ops; handing a cached tensor to the wrong op would be silently wrong. This
    raises PlanMismatch naming the op instead.
    """

    def __init__(self, region: "RegionRuntime", cache: dict[int, Any]) -> None:
        super().__init__()
        self.region, self.cache = region, cache
        self.position = 0

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True

    def __enter__(self):
        self.region.counter.regions += 1
        self.position = 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SAC_IGNORED_OPS:
            return func(*args, **kwargs)
        pos = self.position
        self.position += 1
        region = self.region
        if pos < region.varies and (pos >= len(region.funcs) or func is not region.funcs[pos]):
            want = region.plan.ops[pos].op if pos < len(region.plan.ops) else None
            raise PlanMismatch(
                f"{region.plan.path}: recomputing it in backward ran {func} as op #{pos} where its forward ran "
                f"{want or 'nothing'}. The region's forward depends on state that changed between forward "
                "and backward: a Hugging Face model called with use_cache=True (pass use_cache=False for "
                "training), a global flag, or a module that counts its calls; make its forward repeatable"
            )
        cached = self.cache.pop(pos, _MISSING)
        if cached is not _MISSING:
            return tree_map(lambda x: x.get_val(False), cached)  # raises if it was mutated since
        out = func(*args, **kwargs)
        region.counter.flops += op_flops(func, args, kwargs, out)
        return out


class RegionRuntime:
    """One checkpointed module: its plan, its position in the op sequence, its wrapper."""

    def __init__(self, module: nn.Module, plan: RegionPlan, counter: Counter, *, strict: bool, one_shape: bool) -> None:
        self.module, self.plan, self.counter = module, plan, counter
        self.position = 0
        self.in_forward = False
        self.saves = [o.decision is Decision.SAVE for o in plan.ops]  # by op position
        # the first op whose position and shape change with the data (graph.py's NOTE [ Data-dependent
        # spans ]): ops are checked up to it only, and their number is not checked
        self.varies = next((i for i, o in enumerate(plan.ops) if o.forced is Forced.DATA_DEPENDENT), len(plan.ops))
        # saves some ops: selective checkpointing at every step; otherwise plain checkpoint once checked
        self.check_every_step = strict or any(self.saves)
        self.flops = plan.extra_forward_flops  # what one recomputation of a plain region reruns
        self.funcs: list[Any] = [None] * len(plan.ops)  # the op objects seen there, once checked by name
        self.plain = False  # True once a region that saves nothing has had its ops checked
        self.one_shape = one_shape  # False: other input shapes run the op check again, which needs the hooks
        self.stack: list[str] = []  # the submodules running, for the op check
        self.hooks: list[Any] = []
        for name, sub in module.named_modules():
            if name:
                self.hooks.append(sub.register_forward_pre_hook(partial(self._push, name)))
                self.hooks.append(sub.register_forward_hook(self._pop, always_call=True))
        self.buffers = [module.get_buffer(b) for b in plan.mutated_buffers]
        self.original = module.forward
        module.forward = self.forward  # instance attribute: removed by restore()

    def _push(self, name: str, _m: nn.Module, _a: Any) -> None:
        self.stack.append(name)

    def _pop(self, _m: nn.Module, _a: Any, _o: Any) -> None:
        if self.stack:
            self.stack.pop()

    def _drop_hooks(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()

    def restore(self) -> None:
        self._drop_hooks()
        if self.module.__dict__.get("forward") == self.forward:
            del self.module.forward

    def __getstate__(self) -> dict[str, Any]:
        # op objects do not pickle: a copy compares names until it has seen them; the class's forward is
        # bound to the copy's own module
        return {**self.__dict__, "funcs": [None] * len(self.plan.ops), "stack": [], "original": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.original = MethodType(type(self.module).forward, self.module)

    # ---- forward ------------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled() or self.counter.aside:
            return self.original(*args, **kwargs)  # evaluation, or another mode than the traced step
        # saves nothing, its ops checked at its first step: no dispatch mode. At another of the plan's
        # input shapes the plan does not list the FLOPs, so the dispatch modes count them there.
        # While torch's checkpoint starts and ends, its ops are not the model's and it saves the region's
        # inputs itself: rematerializations wait (``suspended``); the region's own forward resumes them.
        if self.plain and self.counter.check_shapes:
            self.in_forward = True
            self.counter.suspended += 1
            try:
                fn, args, kwargs = _shared_inputs(self._run_plain, args, kwargs)
                return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)
            finally:
                self.in_forward = False
                self.counter.suspended -= 1
        self.position, self.in_forward = 0, True
        self.stack.clear()
        self.counter.suspended += 1
        try:
            fn, args, kwargs = _shared_inputs(self._run, args, kwargs)
            out = checkpoint(
                fn, *args, use_reentrant=False, preserve_rng_state=True, context_fn=self._contexts, **kwargs
            )
        finally:
            self.in_forward = False
            self.counter.suspended -= 1
        if self.position != len(self.plan.ops) and self.varies == len(self.plan.ops):
            raise PlanMismatch(
                f"{self.plan.path} ran {self.position} ops but the plan was traced with "
                f"{len(self.plan.ops)}; the model takes another path than the traced step: "
                "trace and solve again for these inputs"
            )
        if not self.check_every_step:  # checked: from the next step on, plain checkpoint
            self.plain = True
            if self.one_shape:
                self._drop_hooks()
        return out

    def _run(self, *args: Any, **kwargs: Any) -> Any:
        """The region's forward under selective checkpointing (its recomputation counts its own FLOPs)."""
        if self.in_forward:
            return self._forward_inside(*args, **kwargs)
        self.stack.clear()
        return self._recompute(*args, **kwargs)

    def _forward_inside(self, *args: Any, **kwargs: Any) -> Any:
        self.counter.suspended -= 1
        try:
            return self.original(*args, **kwargs)
        finally:
            self.counter.suspended += 1

    def _run_plain(self, *args: Any, **kwargs: Any) -> Any:
        """The region's forward under plain checkpointing: its recomputation pays the plan's FLOPs."""
        if self.in_forward:
            return self._forward_inside(*args, **kwargs)
        self.counter.flops += self.flops
        self.counter.regions += 1
        return self._recompute(*args, **kwargs)

    def _recompute(self, *args: Any, **kwargs: Any) -> Any:
        # Recomputation in backward: put back the buffers it updates again (BatchNorm statistics).
        # The copies bypass the dispatch modes: SAC's recompute mode must see the model's ops only.
        with _disable_current_modes(), torch.no_grad():
            saved = [b.clone() for b in self.buffers]
        try:
            return self.original(*args, **kwargs)
        finally:
            with _disable_current_modes(), torch.no_grad():
                for b, v in zip(self.buffers, saved):
                    b.copy_(v)

    def _contexts(self) -> tuple[Any, Any]:
        cache: dict[int, Any] = {}  # op position -> its cached outputs, taken back by the recomputation
        return _SelectiveForward(self, cache), _SelectiveRecompute(self, cache)

    def check(self, func: Any, out: Any) -> int:
        """The position of the forward op ``func`` that returned ``out``; PlanMismatch unless it is the
        plan's op there, in the same submodule, with the same output shapes (at the plan's own shape)."""
        pos = self.position
        self.position += 1
        if pos >= self.varies:
            return pos  # decided by the data, recomputed as it runs
        module = self.stack[-1] if self.stack else ""
        if pos < len(self.funcs):
            want = self.plan.ops[pos]
            if func is self.funcs[pos] or (self.funcs[pos] is None and str(func) == want.op):
                if module == want.module and (not self.counter.check_shapes or shapes_equal(out, want.shape)):
                    if self.funcs[pos] is None and self.saves[pos] and torch.Tag.nondeterministic_seeded in func.tags:
                        # caching a random op's output would shift the RNG stream of the random ops the
                        # recomputation reruns after it: their masks, and the gradients, would differ
                        raise PlanMismatch(
                            f"{self.plan.path} op #{pos} {func} draws random numbers and cannot be "
                            "saved; the plan was edited by hand: set it back to recompute or "
                            "regenerate it with `ckptplan solve`"
                        )
                    self.funcs[pos] = func  # the op object: later steps compare identity, not names
                    return pos
            elif self.funcs[pos] is None and str(func) in FUSED_ATTENTION and want.op in FUSED_ATTENTION:
                # another fused attention kernel than the plan's (cuDNN's preference depends on the cuDNN
                # release the GPU runs): same output, a logsumexp beside it, nothing else saved
                first = tree_flatten(out)[0][0]
                if module == want.module and (not self.counter.check_shapes or tuple(first.shape) == want.shape[0]):
                    self.funcs[pos] = func
                    return pos
        shapes = [list(t.shape) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        where = f"{self.plan.path}.{module}" if module else self.plan.path
        if pos >= len(self.plan.ops):
            raise PlanMismatch(
                f"{where}: op #{pos} {func} is not in the plan, which has "
                f"{len(self.plan.ops)} ops for {self.plan.path}; trace and solve again"
            )
        want = self.plan.ops[pos]
        raise PlanMismatch(
            f"{where}: op #{pos} is {func} with output shapes {shapes}, but the plan "
            f"expects {want.op} in '{want.module or self.plan.path}' with {[list(s) for s in want.shape]}. "
            "The model now takes another path (input shape, a flag, data-dependent routing) than the "
            "traced step: trace and solve again for these inputs"
        )


# NOTE [ One tensor passed twice ]
# torch's checkpoint saves a region's positional tensor inputs and unpacks each on its own for the
# recomputation. While saved-tensor hooks are active (a plan's rematerializations, a user's
# ``save_on_cpu``) every unpack of a tensor with a history is a new Python object, so self-attention
# called as ``attn(x, x, x)`` sees ``query is key`` in forward but not in the recomputation, and
# nn.MultiheadAttention then projects q, k and v separately: other ops than the forward's. A region's
# checkpoint therefore takes each tensor once; the recomputation rebuilds the arguments from the same
# unpacked object wherever the forward passed one object, keyword arguments included.
def _shared_inputs(run: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[Any, tuple, dict[str, Any]]:
    """(function, positional arguments, keyword arguments) for ``checkpoint`` that call ``run`` with
    ``args`` and ``kwargs``, each tensor among them passed to checkpoint once (NOTE [ One tensor passed
    twice ])."""
    index: dict[int, int] = {}  # id of a positional tensor -> its position among the unique inputs
    unique: list[Any] = []
    layout: list[int] = []  # positional argument -> its position among the unique inputs
    for a in args:
        if isinstance(a, torch.Tensor) and id(a) in index:
            layout.append(index[id(a)])
            continue
        if isinstance(a, torch.Tensor):
            index[id(a)] = len(unique)
        layout.append(len(unique))
        unique.append(a)
    aliased = {k: index[id(v)] for k, v in kwargs.items() if isinstance(v, torch.Tensor) and id(v) in index}
    if len(unique) == len(args) and not aliased:
        return run, args, kwargs  # no tensor passed twice: checkpoint's own unpacking keeps every identity
    rest = {k: v for k, v in kwargs.items() if k not in aliased}
    return partial(_call_shared, run, tuple(layout), tuple(aliased.items())), tuple(unique), rest


def _call_shared(
    run: Any, layout: tuple[int, ...], aliased: tuple[tuple[str, int], ...], *unique: Any, **kwargs: Any
) -> Any:
    """``run`` with the arguments ``_shared_inputs`` took apart: one object wherever the caller passed one."""
    return run(*(unique[i] for i in layout), **kwargs, **{k: unique[i] for k, i in aliased})
