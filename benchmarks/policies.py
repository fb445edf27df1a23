"""Anchor checkpointing policies: what a user would switch on instead of ckptplan, applied to a live model.

``apply_policy(name, model, args, kwargs, knob)`` changes ``model`` in place and returns an ``Applied``
record; one training step is ``default_loss(applied.step_model(*args, **kwargs)).backward()``, and
``applied.undo()`` puts the model back exactly as it was. ``KNOBS`` lists the knob values a benchmark
sweeps per policy. A policy that cannot run on a model raises ``NotApplicable`` saying why.

Blocks (``block_paths``) are the elements of ``ModuleList`` / ``Sequential`` / ``ModuleDict`` containers,
the rule of ``ckptplan.parallel.default_units``, refined so that they are the units a user checkpoints:
single layers (modules without children) are dropped when the containers also hold modules with
children (GPT-2's ``transformer`` ModuleDict also holds ``wte``, ``wpe``, ``drop`` and ``ln_f``; ResNet's
stem is a Sequential of conv/BN/ReLU); when containers hold single layers only, the containers below
the root are the blocks (the U-Net's ``enc1.net``: checkpointing its in-place ReLU alone breaks
autograd); a unit inside another unit is dropped (ResNet's ``layer2.0.shortcut.0`` in ``layer2.0``).
GPT-2: ``transformer.h.*``; Llama: ``layers.*``; ResNet: ``layer1.0`` ... ``layer3.1``.

Policies (all checkpoints are ``torch.utils.checkpoint.checkpoint(use_reentrant=False,
preserve_rng_state=True)`` around a block's ``forward``, installed as an instance attribute so module
paths and state_dict keys do not change; this is what ``checkpoint_wrapper(CheckpointImpl.NO_REENTRANT)``,
``apply_activation_checkpointing`` and HF's ``gradient_checkpointing_enable`` run):

* ``none``: nothing.
* ``full``: every block.
* ``every_k``: blocks whose index i has ``i % k == 0`` (blocks 0, k, 2k, ...). torchtitan's
  ``selective_ac_option = "k"`` counts from 1 and checkpoints blocks k-1, 2k-1, ...: the same number of
  blocks when k divides n, one fewer otherwise. torchtitan also passes ``preserve_rng_state=False``,
  which gives wrong dropout masks on recomputation (OLMo-core#828); we preserve the RNG state.
* ``sqrt_n``: Chen et al.'s rule as ``torch.utils.checkpoint.checkpoint_sequential`` applies it to the
  chain of blocks: ``ceil(sqrt(n))`` segments of ``n // segments`` consecutive blocks, every segment but
  the last checkpointed as one region (only the segment's input is kept). The first block of a segment
  runs the whole segment; the others pass their input through (see ``_sqrt_n``). Needs blocks called
  one after another, each on the previous one's output, with the same extra arguments.
* ``op_sac``: torchtitan's op-level selective checkpointing on every block (``selective_ac_option =
  "op"`` before torchtitan moved to ``get_default_op_list()``): the outputs of matmuls and attention are
  ``MUST_SAVE``, every second matmul of a block and every other op ``PREFER_RECOMPUTE``. torchtitan
  lists ``aten.mm`` only because its Llama has no biases; a Linear with a bias runs ``aten.addmm`` (GPT-2
  here, and any bias on CPU), so addmm is saved too and counts as a matmul for the every-second rule.
  The policy is called in forward only (torch 2.13: ``ctx.is_recompute`` is always False), so one
  counter per checkpointed call suffices. Known failure, left to propagate from the step: an in-place op
  on a saved output raises "Tensor cached during selective activation checkpoint has been mutated"
  (pytorch#119590). The example ResNet does not hit it: convolutions are not on the list, so nothing in
  its blocks is saved and ``op_sac`` equals ``full`` there.
* ``compile_budget``: ``torch._functorch.config.activation_memory_budget = knob`` and
  ``torch.compile(model, backend=aot_eager)`` (the registered backend, its no-op backward compiler also
  noting random ops); the budget is the fraction of the saved bytes the min-cut partitioner may keep.
  Compile time is paid in ``apply`` by one warm-up step (its gradients, buffer updates and RNG draws are
  undone). A budget at which the partitioner recomputes dropout in backward raises NotApplicable: with
  ``functionalize_rng_ops`` off it draws new masks, so the gradients are wrong (gpt2_tiny, dropout 0.1:
  budgets <= 0.6 put ``aten.native_dropout`` in the backward graph; max gradient error 4e-2).
* ``sac_ilp``: PyTorch's ``torch.distributed._tools.sac_ilp`` pipeline, as torch's tests and auto_sac
  run it (see ``_sac_ilp``); it raises NotApplicable without CUDA.

Measuring a compiled step (torch 2.13, CPU): a ``TorchDispatchMode`` that does not declare
``ignore_compile_internals()`` (plain ``MemTracker``, ``FlopCounterMode``) makes dynamo refuse the
compiled frame ("non-infra torch dispatch mode present", seen with ``TORCH_LOGS=+dynamo``; nothing in
``torch._dynamo.utils.counters``) and run the model eagerly, reporting the eager peak at every budget;
the refused code then stays eager until ``torch._dynamo.reset()``. ``ckptplan.measure`` therefore
measures with a ``MemTracker`` subclass and, for compiled models, a FLOP-counting mode that both declare
it, and see the compiled graph (gpt2_tiny: 61.5 / 49.0 / 37.9 / 29.9 / 46.9 / 61.5 MiB at budgets 1.0 /
0.8 / 0.6 / 0.4 / 0.2 / 0.0 without dropout: not monotonic, as pytorch#197838 reports). ``apply`` checks
this once per process on a tiny compiled probe and raises NotApplicable if the measurement cannot see
the compiled graph; the compiled ``step_model`` refuses to run under a mode dynamo would refuse.

Determinism: a policy's choices depend only on the model's structure, one no-grad forward of ``args``,
and for ``sac_ilp`` on roofline estimates and CBC. As with any ``torch.utils.checkpoint`` use, a block's
recomputation updates BatchNorm running statistics a second time (gradients are unaffected; ckptplan's
runtime restores them, these anchors do not, as the users' tools do not).
"""

from __future__ import annotations

import functools
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils._pytree import tree_flatten
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
    noop_context_fn,
)

from ckptplan.solver import baselines
from ckptplan.trace import default_loss

aten = torch.ops.aten


class NotApplicable(Exception):
    """The policy cannot run on this model here; str(e) says why (shown in the benchmark output)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Applied:
    step_model: nn.Module  # what to call for a step: the model itself, or a compiled wrapper
    undo: Callable[[], None]  # puts the model back to plain behaviour
    knob: str  # the knob value used, for the table: "k=2", "budget=0.6", "" ...
    setup_s: float  # planning / compiling (one warm-up step for compile) / wrapping time

    def __post_init__(self) -> None:
        if not isinstance(self.step_model, nn.Module):
            raise TypeError(f"step_model must be an nn.Module, got {type(self.step_model).__name__}")
        if not callable(self.undo):
            raise TypeError("undo must be callable")
        if self.setup_s < 0:
            raise ValueError(f"setup_s must be >= 0, got {self.setup_s}")


KNOBS: dict[str, list] = {
    "none": [None],
    "full": [None],
    "every_k": [2, 3, 4],
    "sqrt_n": [None],
    "op_sac": [None],
    "compile_budget": [1.0, 0.8, 0.6, 0.4, 0.2, 0.0],
    "sac_ilp": ["budget"],  # the runner's budget_bytes
}


def block_paths(model: nn.Module) -> list[str]:
    """Paths of the blocks, in registration order: ckptplan's rule (``baselines.block_paths``)."""
    return baselines.block_paths([(n, type(m).__name__) for n, m in model.named_modules()])


def apply_policy(
    name: str, model: nn.Module, args: tuple, kwargs: dict, knob: Any, *, budget_bytes: int | None = None
) -> Applied:
    """Apply policy ``name`` with ``knob`` to ``model`` in place; ``undo()`` on the result reverts it."""
    if name not in _POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(_POLICIES)}")
    start = time.perf_counter()
    patches = _Patches()
    try:
        step_model, undo, label = _POLICIES[name](model, tuple(args), dict(kwargs or {}), knob, patches, budget_bytes)
    except BaseException:
        patches.undo()
        raise
    return Applied(step_model=step_model, undo=undo, knob=label, setup_s=time.perf_counter() - start)


# ---- patching forwards ------------------------------------------------------------------------------


class _Patches:
    """Forwards installed as instance attributes; ``undo()`` puts back exactly what was there before."""

    _MISSING = object()

    def __init__(self) -> None:
        self._done: list[tuple[nn.Module, Callable, Any]] = []

    def forward(self, module: nn.Module, fn: Callable) -> None:
        previous = module.__dict__.get("forward", self._MISSING)
        if getattr(previous, "_anchor_policy", False):
            raise RuntimeError(
                f"{type(module).__name__} already runs an anchor policy's forward: "
                "call undo() on the previous Applied first"
            )
        fn._anchor_policy = True  # type: ignore[attr-defined]
        module.forward = fn
        self._done.append((module, fn, previous))

    def undo(self) -> None:
        while self._done:
            module, fn, previous = self._done.pop()
            if module.__dict__.get("forward") is fn:
                if previous is self._MISSING:
                    del module.forward
                else:
                    module.forward = previous


def _checkpointed(forward: Callable, context_fn: Callable = noop_context_fn) -> Callable:
    """``forward`` under non-reentrant checkpoint (RNG preserved) when gradients are on."""

    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)  # evaluation: nothing is saved, nothing to recompute
        return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=True, context_fn=context_fn, **kwargs)

    return run


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    paths = block_paths(model)
    if not paths:
        raise NotApplicable("the model has no blocks (no elements of a ModuleList, Sequential or ModuleDict)")
    return [(p, model.get_submodule(p)) for p in paths]


def _wrap_blocks(
    model: nn.Module, patches: _Patches, chosen: Callable[[int], bool], context_fn: Callable = noop_context_fn
) -> None:
    for i, (_path, block) in enumerate(_blocks(model)):
        if chosen(i):
            patches.forward(block, _checkpointed(block.forward, context_fn))


# ---- layer policies ---------------------------------------------------------------------------------


def _none(model, args, kwargs, knob, patches, budget_bytes):
    return model, patches.undo, ""


def _full(model, args, kwargs, knob, patches, budget_bytes):
    _wrap_blocks(model, patches, lambda i: True)
    return model, patches.undo, ""


def _every_k(model, args, kwargs, knob, patches, budget_bytes):
    if isinstance(knob, bool) or not isinstance(knob, int) or knob < 1:
        raise ValueError(f"every_k needs an integer k >= 1, got {knob!r}")
    _wrap_blocks(model, patches, lambda i: i % knob == 0)
    return model, patches.undo, f"k={knob}"


# ---- sqrt(n) segments -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class _Link:
    """One block call in the chain seen by a no-grad forward."""

    path: str
    module: nn.Module
    args: tuple  # positional arguments; args[0] is the chain's tensor
    kwargs: dict
    output: Any


def _sqrt_n(model, args, kwargs, knob, patches, budget_bytes):
    """checkpoint_sequential's segments, installed on the blocks the parent's loop calls.

    The first block of a checkpointed segment runs the whole segment under one checkpoint, passing
    every block the same extra arguments it received and the previous block's output (its element 0
    when a block returns a tuple). The segment's other blocks then return their input unchanged, in
    the structure the block returns (a tensor, or a tuple whose other elements are None). A no-grad
    forward checks that the model's output is bitwise unchanged, which catches parents that use a
    block's output for anything but the next block (collected hidden states, skip connections).
    """
    chain, expected = _trace_chain(model, args, kwargs)
    segments, size = _install_segments(chain, patches)
    del chain  # the traced tensors: the patches keep modules and output structures only
    with _restored(model), torch.no_grad():
        got = model(*args, **kwargs)
    if not _same_output(got, expected):
        raise NotApplicable(
            "the model's output changes when a segment's later blocks pass their input "
            "through: the parent uses block outputs for more than the next block"
        )
    return model, patches.undo, f"segments={segments}x{size}"


def _install_segments(chain: list[_Link], patches: _Patches) -> tuple[int, int]:
    """checkpoint_sequential's split: ceil(sqrt(n)) segments of n // segments blocks, the last one plain."""
    n = len(chain)
    segments = math.ceil(math.sqrt(n))
    size = n // segments
    for start in range(0, size * (segments - 1), size):
        segment = chain[start : start + size]
        _check_same_extras(segment)
        inside = [False]  # True while the segment's first block runs the segment
        first = segment[0].module
        rest = [link.module for link in segment[1:]]
        patches.forward(first, _checkpointed(_segment_runner(first.forward, rest, inside)))
        for link in segment[1:]:
            patches.forward(link.module, _pass_through(link, inside))
    return segments, size


def _trace_chain(model: nn.Module, args: tuple, kwargs: dict) -> tuple[list[_Link], Any]:
    """The blocks in call order, checked to be a chain; and the model's no-grad output."""
    calls: list[_Link] = []
    hooks = []
    for path, block in _blocks(model):

        def record(module: nn.Module, a: tuple, kw: dict, out: Any, path: str = path) -> None:
            calls.append(_Link(path=path, module=module, args=a, kwargs=kw, output=out))

        hooks.append(block.register_forward_hook(record, with_kwargs=True))
    try:
        with _restored(model), torch.no_grad():
            expected = model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    seen: dict[str, int] = {}
    for link in calls:
        seen[link.path] = seen.get(link.path, 0) + 1
    repeated = [p for p, count in seen.items() if count > 1]
    if repeated:
        raise NotApplicable(
            f"block {repeated[0]} is called {seen[repeated[0]]} times in one forward; "
            "sqrt_n needs each block called once"
        )
    if len(calls) < 2:
        raise NotApplicable(f"{len(calls)} block call(s) in a forward: nothing to segment")
    for prev, link in zip([None, *calls], calls):
        if not link.args or not isinstance(link.args[0], torch.Tensor):
            raise NotApplicable(f"block {link.path} does not take a tensor as its first positional argument")
        if prev is not None and link.args[0] is not _chain_tensor(prev):
            raise NotApplicable(
                f"block {link.path}'s input is not block {prev.path}'s output: the blocks "
                "are not one chain (the parent changes the tensor between them)"
            )
    return calls, expected


def _chain_tensor(link: _Link) -> torch.Tensor:
    out = link.output
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, torch.Tensor):
        return out
    raise NotApplicable(f"block {link.path} returns {type(out).__name__}, not a tensor or a tuple starting with one")


def _check_same_extras(segment: list[_Link]) -> None:
    head = segment[0]
    for link in segment[1:]:
        same = (
            len(link.args) == len(head.args)
            and link.kwargs.keys() == head.kwargs.keys()
            and all(_same_value(a, b) for a, b in zip(link.args[1:], head.args[1:]))
            and all(_same_value(link.kwargs[k], head.kwargs[k]) for k in head.kwargs)
        )
        if not same:
            raise NotApplicable(
                f"blocks {head.path} and {link.path} receive different extra arguments; "
                "a segment passes the same ones to all its blocks"
            )


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same_value, a, b))
    try:
        return bool(a == b)
    except Exception:  # objects whose == is not a bool
        return a is b


def _segment_runner(first_forward: Callable, rest: list[nn.Module], inside: list[bool]) -> Callable:
    def run(x: torch.Tensor, *extra: Any, **kwargs: Any) -> Any:
        inside[0] = True
        try:
            out = first_forward(x, *extra, **kwargs)
            for block in rest:  # the module call, so its hooks see the real tensors
                out = block(out[0] if isinstance(out, (tuple, list)) else out, *extra, **kwargs)
        finally:
            inside[0] = False
        return out

    return run


def _pass_through(link: _Link, inside: list[bool]) -> Callable:
    forward, out = link.module.forward, link.output
    if isinstance(out, torch.Tensor):

        def shape(x: torch.Tensor) -> Any:
            return x
    elif isinstance(out, (tuple, list)) and all(o is None for o in out[1:]):
        kind, nones = type(out), [None] * (len(out) - 1)  # not out itself: its tensors would stay alive

        def shape(x: torch.Tensor) -> Any:
            return kind([x, *nones])
    else:
        raise NotApplicable(
            f"block {link.path} returns {type(out).__name__} with more than one tensor: a "
            "block that passes its input through cannot reproduce it"
        )

    def run(x: torch.Tensor, *extra: Any, **kwargs: Any) -> Any:
        if inside[0]:
            return forward(x, *extra, **kwargs)  # called by the segment's first block
        return shape(x)  # x is already the segment's output

    return run


def _same_output(a: Any, b: Any) -> bool:
    fa, spec_a = tree_flatten(a)
    fb, spec_b = tree_flatten(b)
    if spec_a != spec_b:
        return False
    return all(
        torch.equal(x, y) and x.dtype == y.dtype if isinstance(x, torch.Tensor) else x == y for x, y in zip(fa, fb)
    )


@contextmanager
def _restored(model: nn.Module, *, grads: bool = False) -> Iterator[None]:
    """Undo what a probing step changes besides its outputs: buffers, RNG draws, and gradients."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    cuda = any(p.is_cuda for p in model.parameters())
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if cuda else None
    saved_grads = (
        [(p, None if p.grad is None else p.grad.detach().clone()) for p in model.parameters()] if grads else []
    )
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in buffers:
                b.copy_(value)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        for p, g in saved_grads:
            p.grad = g


# ---- op-level selective checkpointing ---------------------------------------------------------------


def _op_sac_policy(rule: baselines.OpSacRule, ctx: Any, func: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    # the rule is the one ckptplan's predicted baseline uses (baselines.op_sac_keeps)
    return CheckpointPolicy.MUST_SAVE if rule.keeps(str(func)) else CheckpointPolicy.PREFER_RECOMPUTE


def _op_sac_contexts() -> tuple[Any, Any]:
    return create_selective_checkpoint_contexts(functools.partial(_op_sac_policy, baselines.OpSacRule()))  # per call


def _op_sac(model, args, kwargs, knob, patches, budget_bytes):
    _wrap_blocks(model, patches, lambda i: True, _op_sac_contexts)
    return model, patches.undo, ""


# ---- torch.compile with an activation memory budget --------------------------------------------------


class _CompileProbe(nn.Module):
    """A tiny module compiled once to see whether ckptplan.measure.measure_peak runs compiled graphs."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.w).sin().sum()


@functools.cache
def _why_measure_peak_misses_compiled_graphs() -> str | None:
    """None if measure_peak (CPU: MemTracker) runs a compiled step's graph; else why it does not."""
    from torch._dynamo.backends.common import aot_autograd

    from ckptplan.measure import measure_peak

    runs = [0]

    def compiler(gm: torch.fx.GraphModule, _example: Any) -> Callable:
        def run(inputs: list) -> Any:
            runs[0] += 1
            return gm(*inputs)

        run._boxed_call = True  # type: ignore[attr-defined]
        return run

    probe = torch.compile(_CompileProbe(), backend=aot_autograd(fw_compiler=compiler, bw_compiler=compiler))
    x = torch.ones(4)
    probe(x).backward()  # compiles outside any dispatch mode
    before = runs[0]
    measure_peak(probe, x)
    if runs[0] > before:
        return None
    return (
        "off CUDA, ckptplan.measure.measure_peak cannot see a compiled step: its MemTracker is a "
        "TorchDispatchMode without ignore_compile_internals(), so dynamo skips the compiled frame "
        "('non-infra torch dispatch mode present') and runs the model eagerly, reporting the eager "
        "peak for every budget (a MemTracker subclass with ignore_compile_internals() -> True sees it)"
    )


def _dynamo_refuses_current_modes() -> bool:
    """Dynamo's own test (convert_frame) for running a frame eagerly because of a dispatch mode."""
    from torch._dynamo import config as dynamo_config
    from torch.utils._python_dispatch import (
        any_torch_dispatch_mode_on_stack,
        is_in_any_mode_without_ignore_compile_internals,
    )

    if dynamo_config.inline_torch_dispatch_torch_compile:
        return any_torch_dispatch_mode_on_stack()
    return is_in_any_mode_without_ignore_compile_internals()


class _CompiledStep(nn.Module):
    """The compiled model; refuses to run where dynamo would silently run it eagerly instead."""

    def __init__(self, compiled: nn.Module) -> None:
        super().__init__()
        self.compiled = compiled

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if _dynamo_refuses_current_modes():
            raise RuntimeError(
                "a TorchDispatchMode without ignore_compile_internals() is active (MemTracker, "
                "FlopCounterMode, ...): dynamo would run this step eagerly, and keep running the model's "
                "forward eagerly until torch._dynamo.reset(); measure a compiled step without such a mode"
            )
        return self.compiled(*args, **kwargs)


def _compile_budget(model, args, kwargs, knob, patches, budget_bytes):
    if isinstance(knob, bool) or not isinstance(knob, (int, float)) or not 0.0 <= knob <= 1.0:
        raise ValueError(f"compile_budget needs a fraction in [0, 1], got {knob!r}")
    on_cuda = any(p.is_cuda for p in model.parameters())
    if not on_cuda and (why := _why_measure_peak_misses_compiled_graphs()):
        raise NotApplicable(why)
    from torch._functorch import config

    previous = config.activation_memory_budget

    def undo() -> None:
        config.activation_memory_budget = previous
        torch._dynamo.reset()

    # the budget is read when the graph is partitioned: drop graphs compiled under another budget
    torch._dynamo.reset()
    config.activation_memory_budget = float(knob)
    redrawn: set[str] = set()
    step = _CompiledStep(torch.compile(model, backend=_aot_eager_noting_redraws(redrawn)))
    try:
        with _restored(model, grads=True):
            default_loss(step(*args, **kwargs)).backward()  # compile now, so setup_s includes it
    except BaseException:
        undo()
        raise
    if redrawn:
        undo()
        raise NotApplicable(
            f"at budget {knob:g} the partitioner recomputes {', '.join(sorted(redrawn))} in backward, which "
            "draws new random numbers (torch._functorch.config.functionalize_rng_ops is off): the gradients "
            "would not match the forward's dropout masks"
        )
    return step, undo, f"budget={knob:g}"


def _aot_eager_noting_redraws(redrawn: set[str]) -> Callable:
    """The aot_eager backend, its backward compiler (a no-op) noting ops there that draw random numbers."""
    from torch._dynamo.backends.debugging import aot_eager, boxed_nop

    def bw_compiler(gm: torch.fx.GraphModule, example_inputs: Any) -> Callable:
        redrawn.update(str(n.target) for n in gm.graph.nodes if _draws_random_numbers(n))
        return boxed_nop(gm, example_inputs)

    return functools.partial(aot_eager, bw_compiler=bw_compiler)


def _draws_random_numbers(node: torch.fx.Node) -> bool:
    op = node.target
    if (
        node.op != "call_function"
        or not isinstance(op, torch._ops.OpOverload)
        or torch.Tag.nondeterministic_seeded not in op.tags
    ):
        return False
    for i, arg in enumerate(op._schema.arguments):  # dropout with p=0 or train=False draws nothing
        value = node.kwargs.get(arg.name, node.args[i] if i < len(node.args) else arg.default_value)
        if (arg.name in ("p", "dropout_p") and value == 0) or (arg.name == "train" and value is False):
            return False
    return True


# ---- PyTorch's SAC MILP ---------------------------------------------------------------------------


def _why_sac_ilp_cannot_run(model: nn.Module) -> str | None:
    """None if torch's SAC MILP pipeline can run on ``model`` here; else the concrete reasons."""
    problems = []
    if not any(p.is_cuda for p in model.parameters()):
        problems.append(
            "its per-op runtimes need CUDA: RuntimeEstimator._roofline_estimate (mode "
            "'operator-level-cost-model', the one torch's tests use) asserts torch.cuda.is_available() "
            "('Roofline estimation needs to access CUDA capabilities to make estimations'), and mode "
            "'operator-level-benchmark' times kernels with torch.cuda.Event ('Tried to instantiate "
            "dummy base class Event' on this CPU build)"
        )
    for package, why in (
        ("pulp", "sac_ilp solves its MILPs with PuLP"),
        ("pwlf", "ilp_utils.aggregate_stats fits trade-off curves with pwlf"),
    ):
        try:
            __import__(package)
        except ImportError:
            problems.append(f"{why}, which is not installed (pip install {package})")
    if not problems:
        return None
    return "torch.distributed._tools.sac_ilp cannot run here: " + "; ".join(problems)


def _sac_ilp_estimators(model: nn.Module, args: tuple, kwargs: dict) -> tuple[Any, Any]:
    """torch's test recipe (test_sac_ilp.py) on a fake copy of the model: module info and SAC stats."""
    import contextlib
    import copy
    import io

    from torch._subclasses.fake_tensor import FakeCopyMode, FakeTensorMode
    from torch.distributed._tools.ilp_utils import aggregate_stats
    from torch.distributed._tools.mem_tracker import MemTracker, _ModState
    from torch.distributed._tools.runtime_estimator import RuntimeEstimator
    from torch.distributed._tools.sac_estimator import SACEstimator
    from torch.utils._pytree import tree_map_only

    device = next(p.device for p in model.parameters())
    fake_mode = FakeTensorMode()
    with FakeCopyMode(fake_mode):
        fake = copy.deepcopy(model)
    fake_args, fake_kwargs = tree_map_only(torch.Tensor, fake_mode.from_tensor, (args, kwargs))

    def step() -> None:
        default_loss(fake(*fake_args, **fake_kwargs)).backward()
        fake.zero_grad(set_to_none=True)

    with fake_mode, contextlib.redirect_stdout(io.StringIO()):  # the estimators print totals
        mem_tracker = MemTracker()
        mem_tracker.track_external(fake)
        with mem_tracker:
            for i in range(2):  # the second step is the steady state the test measures
                if i == 1:
                    mem_tracker.reset_mod_stats()
                default_loss(fake(*fake_args, **fake_kwargs)).backward()
                last = mem_tracker.get_tracker_snapshot("current")
                fake.zero_grad(set_to_none=True)
        for stats in mem_tracker.memory_tracking.values():
            # as the test does: ModTracker misses the post-backward of modules whose inputs need no grad
            if _ModState.POST_BW not in stats.snapshots:
                stats.snapshots[_ModState.POST_BW] = [copy.deepcopy(last)]
        runtime = RuntimeEstimator()
        step()
        with runtime(estimate_mode_type="operator-level-cost-model"):
            step()
        sac = SACEstimator()
        with sac(estimate_mode_type="operator-level-cost-model"):
            loss = default_loss(fake(*fake_args, **fake_kwargs))
        loss.backward()
        fake.zero_grad(set_to_none=True)
        info = aggregate_stats(fake, mem_tracker, runtime, sac, device)
    return info, sac


class _SACILPPolicy:
    """torch's auto-SAC op policy: the module's ops by position, as SACEstimator listed them."""

    def __init__(self, func_names: list[str], keep: list[int]) -> None:
        self.func_names, self.keep, self.count = func_names, keep, 0

    def __call__(self, ctx: Any, func: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        from torch.distributed._tools.sac_estimator import OPS_TO_ALWAYS_SKIP

        if func in OPS_TO_ALWAYS_SKIP:
            return CheckpointPolicy.MUST_RECOMPUTE
        i = self.count
        if i >= len(self.func_names) or func._overloadpacket.__name__ != self.func_names[i]:
            return CheckpointPolicy.MUST_RECOMPUTE  # an op the estimator did not list (auto_sac does this)
        self.count += 1
        return CheckpointPolicy.PREFER_SAVE if self.keep[i] == 1 else CheckpointPolicy.MUST_RECOMPUTE


def _sac_ilp(model, args, kwargs, knob, patches, budget_bytes):
    """sac_milp picks modules and the fraction of their activation memory to discard; a per-module
    MILP then picks the ops to save. Mirrors torch's auto_sac (get_auto_sac_policies with
    SACAlgorithm.OPTIMAL, apply_auto_sac_policies), which torch 2.13 does not ship."""
    if budget_bytes is None or budget_bytes <= 0:
        raise ValueError(f"sac_ilp needs budget_bytes > 0 (the peak budget), got {budget_bytes!r}")
    if why := _why_sac_ilp_cannot_run(model):
        raise NotApplicable(why)
    from torch.distributed._tools.ilp_utils import parse_module_info
    from torch.distributed._tools.sac_ilp import get_optimal_checkpointing_policy_per_module, sac_milp

    info, sac = _sac_ilp_estimators(model, args, kwargs)
    order = info["mod_order"]["fw_pre_order"]
    if repeated := sorted({fqn for fqn in order if order.count(fqn) > 1}):
        raise NotApplicable(
            f"module {repeated[0]} runs {order.count(repeated[0])} times in one forward; "
            "torch's SAC MILP (ilp_utils.parse_module_info) needs each module run once"
        )
    budget_gib = budget_bytes / 2**30
    decisions, _recompute_ms, peak = sac_milp(parse_module_info(info), memory_budget=budget_gib)
    if peak == -1:  # sac_milp's "no solution"
        raise NotApplicable(f"sac_milp finds no solution within {budget_gib:.4g} GiB")
    for fqn, discard in sorted(decisions.items()):
        stats = sac.sac_mod_stats[fqn]
        keep = get_optimal_checkpointing_policy_per_module(stats, memory_budget=1 - discard)
        if len(keep) != len(stats.func_names):  # [] is its "no solution"
            raise NotApplicable(f"the per-module SAC MILP finds no solution for {fqn}")
        module = model.get_submodule(fqn.partition(".")[2])  # ModTracker names the root by its class
        contexts = functools.partial(_sac_ilp_contexts, stats.func_names, keep)
        patches.forward(module, _checkpointed(module.forward, contexts))
    return model, patches.undo, f"budget={budget_gib:.4g}GiB"


def _sac_ilp_contexts(func_names: list[str], keep: list[int]) -> tuple[Any, Any]:
    return create_selective_checkpoint_contexts(_SACILPPolicy(func_names, keep))  # one count per call


_POLICIES: dict[str, Callable] = {
    "none": _none,
    "full": _full,
    "every_k": _every_k,
    "sqrt_n": _sqrt_n,
    "op_sac": _op_sac,
    "compile_budget": _compile_budget,
    "sac_ilp": _sac_ilp,
}
