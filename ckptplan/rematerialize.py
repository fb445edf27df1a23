"""A plan's rematerializations at run time (solver/remat.py): saved tensors packed as the ops that made them.

For the length of the forward of each module call that runs a recipe, a dispatch mode counts the call's
ops by position, as the trace did, and records each recipe op with its arguments: tensors the recipe
made become references to its own outputs, the others (the recipe's inputs, which backward keeps
anyway) are kept as detached aliases. An op the plan keeps (decision save) is not rerun: its outputs,
which backward keeps anyway, are held as inputs. After the recipe's last op the target's storage is registered.
A saved-tensor hook, pushed for the model's forward, then packs every tensor of that storage as a
handle to the recipe instead of the tensor, so the storage dies when Python drops it. The first unpack
reruns the recipe (no grad, buffers it writes given as copies: BatchNorm statistics are updated once
per step), counts its FLOPs, and keeps the rebuilt tensor until every handle has been unpacked or freed,
as autograd's saved tensor would have been.

Each recipe op is compared with the plan (op, submodule, output shapes); a difference raises
``PlanMismatch`` in forward, before any gradient. While a checkpointed region starts or ends (torch's
checkpoint runs ops of its own, and saves the region's inputs), nothing is counted or rematerialized:
the checkpoint holds its inputs, as the plan predicts.
"""

from __future__ import annotations

import sys
from functools import partial
from types import FrameType, MethodType
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.checkpoint import SAC_IGNORED_OPS
from torch.utils.weak import WeakIdKeyDictionary

from .errors import InputError, PlanMismatch
from .flops import op_flops
from .graph import Forced, parse_path
from .opfacts import HIDDEN_WRITES
from .plan import Decision, RegionPlan

KEPT = Forced.KEPT.value  # an op of a recipe that the rerun reads instead of running (solver/remat.py)
_COMPILED = (
    "Under torch.compile a plan cannot rematerialize: the compiled graph runs other ops than the traced "
    "step. For a compiled model solve with `ckptplan solve --no-remat` (solve(..., rematerialize=False)); "
    "torch.compile's memory budget recomputes such tensors itself"
)


class _Ref:
    """An argument the recipe made itself: tensor output ``k`` of its op ``i``."""

    __slots__ = ("i", "k")

    def __init__(self, i: int, k: int) -> None:
        self.i, self.k = i, k


class _Copy:
    """A buffer the op writes (BatchNorm's running statistics): the rerun writes a copy of it instead."""

    __slots__ = ("t",)

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


class _Recipe:
    """One target tensor's recipe, shared by every handle that packs it."""

    def __init__(self, plan: RegionPlan, ops: list[tuple[Any, list[Any], Any]], counter: Any) -> None:
        self.plan, self.ops, self.counter = plan, ops, counter
        self.value: torch.Tensor | None = None  # the rebuilt target, while some handle may still unpack it
        self.pending = 0  # handles neither unpacked nor freed

    def rebuild(self) -> torch.Tensor:
        if self.value is None:
            outs: list[list[torch.Tensor]] = []
            with torch.no_grad():
                for func, flat, spec in self.ops:
                    if func is None:  # a kept op: its outputs, held since forward
                        outs.append(flat)
                        continue
                    leaves = [
                        outs[a.i][a.k] if isinstance(a, _Ref) else a.t.clone() if isinstance(a, _Copy) else a
                        for a in flat
                    ]
                    args, kwargs = tree_unflatten(leaves, spec)
                    out = func(*args, **kwargs)
                    self.counter.flops += op_flops(func, args, kwargs, out)
                    outs.append([t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)])
            assert self.plan.target is not None  # a rematerialization names its target
            i, k = self.plan.target
            self.value = outs[i][k]
            self.counter.regions += 1
        return self.value

    def done(self) -> None:
        self.pending -= 1
        if self.pending <= 0:
            self.value = None


class _Packed:
    """What autograd saves instead of a rematerialized tensor: its recipe and its view of the storage."""

    __slots__ = ("recipe", "geometry", "open", "__weakref__")

    def __init__(self, recipe: _Recipe, t: torch.Tensor) -> None:
        self.recipe, self.open = recipe, True
        self.geometry = (tuple(t.shape), t.stride(), t.storage_offset(), t.dtype)
        recipe.pending += 1

    def unpack(self) -> torch.Tensor:
        if torch.is_grad_enabled():  # backward(create_graph=True): the rebuilt tensor would have no history
            raise PlanMismatch(
                f"{self.recipe.plan.path}: a rematerialized tensor cannot take part in a "
                "higher-order gradient (backward with create_graph=True, torch.autograd.grad of "
                "a gradient); solve the plan with `ckptplan solve --no-remat` for that training"
            )
        value = self.recipe.rebuild()
        if self.open:
            self.open = False
            self.recipe.done()  # the caller holds the value while backward's node uses it
        shape, stride, offset, dtype = self.geometry
        if (tuple(value.shape), value.stride(), value.storage_offset(), value.dtype) == self.geometry:
            return value
        if dtype == value.dtype:
            return value.as_strided(shape, stride, offset)  # a view of the target: the same view of the rebuilt one
        with torch.no_grad():  # a view as another dtype: the same bytes, read as that dtype
            return torch.empty(0, dtype=dtype, device=value.device).set_(value.untyped_storage(), offset, shape, stride)

    def __del__(self) -> None:
        if getattr(self, "open", False):  # freed without an unpack (a node backward never ran)
            self.open = False
            self.recipe.done()


class _Recording:
    """A recipe being recorded: its ops so far, and which tensors they made."""

    def __init__(self, start: int, plan: RegionPlan) -> None:
        self.start, self.plan = start, plan
        self.ops: list[tuple[Any, list[Any], Any]] = []
        self.made: dict[int, tuple[int, int]] = {}  # id of a tensor an op made -> (op, output)
        self.outs: list[list[torch.Tensor]] = []  # keeps those ids valid while the recipe is recorded
        self.aliases: list[torch.Tensor] = []  # detached views of what it made (their ids in ``made``)


class _RecipeMode(TorchDispatchMode):
    """One call of a module that runs recipes: counts its ops, records the recipes' ops, registers targets."""

    def __init__(self, owner: "Rematerializer", anchor: str, plans: list[tuple[int, RegionPlan]]) -> None:
        super().__init__()
        self.owner, self.anchor = owner, anchor
        self.starts: dict[int, list[RegionPlan]] = {}  # recipes by the position of their first op in the call
        for offset, plan in plans:
            self.starts.setdefault(offset, []).append(plan)
        self.expected = len(plans)
        self.position = 0
        self.active: list[_Recording] = []
        self.registered = 0
        self.stack: list[str] = []  # the anchor's submodules now running (relative paths), for the op check

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        owner = self.owner
        if owner.counter.suspended:
            return func(*args, **kwargs)
        if func in SAC_IGNORED_OPS:  # not counted; a detach of a tensor a recipe made is that tensor to it
            out = func(*args, **kwargs)
            for rec in self.active:
                made = [rec.made[id(a)] for a in args if isinstance(a, torch.Tensor) and id(a) in rec.made]
                if made and isinstance(out, torch.Tensor):
                    rec.made.setdefault(id(out), made[0])
                    rec.aliases.append(out)
            return out
        pos = self.position
        self.position += 1
        for plan in self.starts.get(pos, ()):
            self.active.append(_Recording(pos, plan))
        if not self.active:
            return func(*args, **kwargs)
        flat, spec = tree_flatten((args, kwargs))
        writes = _written(func, args, kwargs)
        out = func(*args, **kwargs)
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        module = self.stack[-1] if self.stack else ""
        for rec in list(self.active):
            i = pos - rec.start
            want = rec.plan.ops[i]
            if (
                str(func) != want.op
                or module != want.module
                or (owner.counter.check_shapes and not shapes_equal(out, want.shape))
            ):
                shapes = [list(t.shape) for t in outs]
                raise PlanMismatch(
                    f"{rec.plan.path}: op #{i} of the recipe is {func} in '{module}' with output shapes {shapes}, "
                    f"but the plan expects {want.op} in '{want.module}' with {[list(x) for x in want.shape]}. "
                    "The model now takes another path than the traced step: trace and solve again for these inputs."
                    f"{_compile_note()}"
                )
            if want.decision is Decision.SAVE:  # kept: the rerun reads its outputs instead of running it
                rec.ops.append((None, [t.detach() for t in outs], None))
            else:
                recorded: list[Any] = []
                for a in flat:
                    if isinstance(a, torch.Tensor):
                        a = (
                            _Ref(*rec.made[id(a)])
                            if id(a) in rec.made
                            else _Copy(a.detach())
                            if id(a) in writes
                            else a.detach()
                        )
                    recorded.append(a)
                rec.ops.append((func, recorded, spec))
            for k, t in enumerate(outs):
                rec.made.setdefault(id(t), (i, k))
            rec.outs.append(outs)
            if i + 1 == len(rec.plan.ops):
                ti, tk = rec.plan.target
                owner.register(rec.outs[ti][tk], _Recipe(rec.plan, rec.ops, owner.counter))
                self.active.remove(rec)
                self.registered += 1
        return out


def _compile_note() -> str:
    """``_COMPILED`` after a space when the op runs under torch.compile (dynamo tracing, or inside a compiled
    module's call), else nothing: an eager model's mismatch has another cause, whatever else this process
    compiled."""
    return f" {_COMPILED}" if torch.compiler.is_compiling() or _in_compiled_module() else ""


def _in_compiled_module(depth: int = 64) -> bool:
    """Whether this call runs inside a ``torch.compile``d module's ``__call__`` (up to ``depth`` frames)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    if eval_frame is None:  # nothing was compiled in this process (and importing dynamo takes a second)
        return False
    compiled_call = eval_frame.OptimizedModule.__call__.__code__
    frame: FrameType | None = sys._getframe(1)
    for _ in range(depth):
        if frame is None:
            return False
        if frame.f_code is compiled_call:
            return True
        frame = frame.f_back
    return False


def shapes_equal(out: Any, want: tuple[tuple[int, ...], ...]) -> bool:
    """Whether an op's tensor outputs have the plan's shapes (``((),)`` for an op that returns none)."""
    if isinstance(out, torch.Tensor):  # most ops: no flattening
        return len(want) == 1 and out.shape == want[0]
    shapes = tuple(tuple(t.shape) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
    return (shapes or ((),)) == want


def _written(func: Any, args: tuple, kwargs: dict) -> set[int]:
    """Ids of the buffers ``func`` writes in place (its schema's writes, BatchNorm's hidden ones)."""
    schema = func._schema.arguments
    values = list(args) + [kwargs.get(a.name) for a in schema[len(args) :]]
    written = {n for n, a in enumerate(schema) if a.alias_info is not None and a.alias_info.is_write}
    positions, training = HIDDEN_WRITES.get(func, ((), None))
    if training is not None and len(args) > training and args[training]:
        written.update(positions)
    return {id(values[n]) for n in written if n < len(values) and isinstance(values[n], torch.Tensor)}


class Rematerializer:
    """Every rematerialization of a plan, on a live model."""

    def __init__(self, model: nn.Module, plans: list[RegionPlan], counter: Any) -> None:
        self.counter = counter
        self.targets: WeakIdKeyDictionary = WeakIdKeyDictionary()  # storage -> its recipe
        self.modes: list[_RecipeMode | None] = []
        self.running: dict[str, _RecipeMode] = {}  # anchor module -> its mode, while its call runs
        by_module: dict[str, list[tuple[int, RegionPlan]]] = {}
        for p in plans:
            for i, o in enumerate(p.ops):
                # a recipe keeps exactly its kept ops (their outputs read as inputs) and reruns the others
                if (o.decision is Decision.SAVE) != (o.forced == KEPT):
                    raise InputError(
                        f"{p.path} op #{i} {o.op}: a rematerialization saves exactly its ops marked "
                        f"{KEPT!r} and reruns the others; set it back to "
                        f"{'save' if o.forced == KEPT else 'recompute'}, or regenerate the plan"
                    )
            anchor, offset = parse_path(p.path)
            by_module.setdefault(anchor, []).append((offset, p))
        # the saved-tensor hooks last the model's forward (whatever it raises); registered first, so they
        # are in place when the root module's own recipe mode starts
        # Hooks are bound methods and partials, not closures: a deep copy of the model then copies them
        # bound to the copy's own Rematerializer (NOTE [ Copying a planned model ] in runtime.py).
        self.hooks = [model.register_forward_pre_hook(self._begin)]
        for path, own in sorted(by_module.items()):
            module = model.get_submodule(path)
            self.hooks.append(module.register_forward_pre_hook(partial(self._enter, path, own)))
            self.hooks.append(module.register_forward_hook(self._exit, always_call=True))
            for name, sub in module.named_modules():
                if name:  # the op check compares the submodule each recipe op runs in
                    self.hooks.append(sub.register_forward_pre_hook(partial(self._push, path, name)))
                    self.hooks.append(sub.register_forward_hook(partial(self._pop, path), always_call=True))
        self.hooks.append(model.register_forward_hook(self._end, always_call=True))
        self.saved_hooks: Any = None
        # The model's forward runs inside ``self._forward``: torch runs always_call forward hooks after an
        # Exception but not after a KeyboardInterrupt, so this try is what takes the recipe modes and the
        # saved-tensor hooks off torch's global stacks whatever the forward raises.
        self.model = model
        self.inner = model.forward  # the class's forward, or a checkpointed region's (the root's)
        self.own_forward = "forward" in model.__dict__
        model.forward = self._forward

    # ---- the model's forward: the saved-tensor hooks ------------------------------------------------------
    def _begin(self, _m: nn.Module, _a: Any) -> None:
        # fullgraph=True traces this hook; otherwise dynamo runs it eagerly, inside the compiled module's call
        if torch.compiler.is_compiling() or _in_compiled_module():
            raise PlanMismatch(f"the plan rematerializes tensors. {_COMPILED}")
        if torch.is_grad_enabled() and self.saved_hooks is None and not getattr(self.counter, "aside", False):
            self.saved_hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            self.saved_hooks.__enter__()

    def _end(self, _m: nn.Module, _a: Any, _o: Any) -> None:
        self.end()

    def end(self) -> None:
        if self.saved_hooks is not None:
            self.saved_hooks.__exit__(None, None, None)
            self.saved_hooks = None

    def register(self, target: torch.Tensor, recipe: _Recipe) -> None:
        self.targets[target.untyped_storage()] = recipe

    def _pack(self, t: torch.Tensor) -> Any:
        if self.counter.suspended:
            return t
        recipe = self.targets.get(t.untyped_storage())
        return t if recipe is None else _Packed(recipe, t)

    @staticmethod
    def _unpack(packed: Any) -> torch.Tensor:
        return packed.unpack() if isinstance(packed, _Packed) else packed

    # ---- the module calls that run recipes -------------------------------------------------------------------
    def _enter(self, anchor: str, plans: list[tuple[int, RegionPlan]], _m: nn.Module, _a: Any) -> None:
        if self.saved_hooks is None or not torch.is_grad_enabled():
            self.modes.append(None)  # evaluation, or a call outside the model's forward
            return
        mode = _RecipeMode(self, anchor, plans)
        mode.__enter__()
        self.modes.append(mode)
        self.running[anchor] = mode

    def _push(self, anchor: str, name: str, _m: nn.Module, _a: Any) -> None:
        mode = self.running.get(anchor)
        if mode is not None:
            mode.stack.append(name)

    def _pop(self, anchor: str, _m: nn.Module, _a: Any, _o: Any) -> None:
        mode = self.running.get(anchor)
        if mode is not None and mode.stack:
            mode.stack.pop()

    def _exit(self, _m: nn.Module, _a: Any, _o: Any) -> None:
        if not self.modes:
            return
        mode = self.modes.pop()
        if mode is None:
            return
        mode.__exit__(None, None, None)
        self.running.pop(mode.anchor, None)
        if mode.registered != mode.expected and sys.exc_info()[0] is None:  # not while forward raises already
            first = next(iter(mode.active), None)
            path = first.plan.path if first else mode.starts[max(mode.starts)][0].path
            raise PlanMismatch(
                f"{path}: the module ran {mode.position} ops, fewer than the plan's recipe needs; the "
                "model takes another path than the traced step: trace and solve again for these "
                f"inputs.{_compile_note()}"
            )

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.inner(*args, **kwargs)
        except BaseException:
            self.unwind()
            raise

    def unwind(self) -> None:
        """Leave every recipe mode and the saved-tensor hooks this forward entered, newest first (after an
        Exception the always_call hooks have done it already; after a KeyboardInterrupt they never ran)."""
        while self.modes:
            mode = self.modes.pop()
            if mode is not None:
                mode.__exit__(None, None, None)
        self.running.clear()
        self.end()

    def __getstate__(self) -> dict[str, Any]:
        # between steps nothing is in flight: a copy starts with no registered targets
        return {
            **self.__dict__,
            "targets": None,
            "modes": [],
            "running": {},
            "saved_hooks": None,
            "inner": self.inner if self.own_forward else None,
        }  # the class's forward: bound again

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, targets=WeakIdKeyDictionary())
        if self.inner is None:
            self.inner = MethodType(type(self.model).forward, self.model)

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
        self.unwind()
        if self.model.__dict__.get("forward") == self._forward:
            if self.own_forward:
                self.model.forward = self.inner
            else:
                del self.model.forward
