"""Rematerialization candidates: tensors dropped after forward and rebuilt from what backward keeps anyway.

Checkpointing drops what a module saves inside itself. Eager autograd still keeps every tensor that an
op outside saves: the BatchNorm + ReLU output that the next convolution saves for its weight gradient
is held from forward to backward, whatever the plan checkpoints, unless one checkpoint spans both
modules (and that checkpoint then keeps its own input). torch.compile's partitioner instead recomputes
such cheap tensors just before backward uses them. A rematerialization does the same in eager mode: a
saved-tensor hook packs the tensor as the few ops that made it (its recipe) over inputs that backward
keeps anyway (the convolution output BatchNorm saves, the parameters), and its first unpack reruns them.

A candidate is one storage S such that:

* its producer and every op writing S in place lie within ``MAX_SPAN`` consecutive ops
  ``[first_op, end_op)`` ending at the last write; the range grows backwards over the producers of
  inputs nobody saves (the BatchNorm output that a ReLU reads out of place). The recipe reruns every op
  of the range (at most ``MAX_OPS``, never a random one) but those it can keep: an op whose outputs
  backward keeps anyway (saved by some op) and that makes neither S nor a tensor the recipe rebuilds,
  such as the shortcut convolution between a ResNet block's second BatchNorm and its add. Their
  outputs are inputs of the recipe;
* autograd saved S only after its last write (its final value is what backward reads), and only
  inside the model's forward (a loss computed outside it would keep its own reference);
* no op of the range writes a storage from outside it, except buffers (BatchNorm statistics: the rerun
  writes copies), and no input from outside is written later in the step (the rerun would read
  another value);
* one call of the innermost module that runs the range. The candidate's path nests under that module
  (``<module>.@<offset of its first op in the call>``, ``:<k>`` for the k-th output of an op that makes
  several), so a plan never checkpoints the module, or any around it, and rematerializes inside it
  at once. A longer recipe that also rebuilds an input another candidate rematerializes (``_chained``)
  nests under the shorter recipe of the same tensor instead (``<its path>.~<levels up>@<offset>``): a
  plan takes one of them at most.

In the solver it is a region whose decision drops S from Python's last use in forward to its first
unpack, reruns the recipe once just before that unpack (the rebuilt value is then held until the last
unpack, as the saved tensor was), holds the recipe's inputs until then, and costs the recipe's ops and
its own overhead; the recipe mode over its module call and the saved-tensor hook are ``Region.shared``,
paid once however many recipes use them.
"""

from __future__ import annotations

from ..costmodel import profile_of
from ..graph import Forced, Graph, ModuleCall, StorageKind, module_parts, parse_path
from .regions import Region, _overheads, forward_order

MAX_OPS = 6  # most ops a recipe reruns: BatchNorm (with its counter and buffer ops), an add and a ReLU fit
MAX_SPAN = 12  # most forward ops from a recipe's first op to its last, kept ones included
MIN_FRACTION = 0.001  # storages below this fraction of the no-checkpointing peak are not worth a variable
TYPE_NAME = "rematerialize"  # Region.type_name (and the plan file's block type) of a rematerialization
SHARED_MODE = "recipe mode of "  # Region.shared key of the recipe mode over a module call ('' is the root)
SHARED_HOOK = "saved-tensor hook"  # Region.shared key of the hook every rematerialization packs through


def remat_candidates(graph: Graph, regions: tuple[Region, ...] = ()) -> tuple[Region, ...]:
    """The storages of ``graph`` that a rematerialization may drop, as regions (``Region.target``).

    ``regions``: the checkpoint candidates; a storage that one of them inside the module drops by itself
    (made and saved only inside it) is left to it."""
    storages = graph.storages
    writers: dict[int, list[int]] = {}
    for op in graph.ops:
        for sid in op.mutates:
            writers.setdefault(sid, []).append(op.index)
    smallest = MIN_FRACTION * graph.baseline_peak_bytes
    root = [m for m in graph.modules if m.path == ""]
    forward_end = root[0].end_op if len(root) == 1 else -1  # the run hooks the model's forward only
    out: list[Region] = []
    for s in storages:
        if (
            s.kind is not StorageKind.ACTIVATION
            or s.producer is None
            or not s.saved_by
            or s.nbytes < smallest
            or s.first_unpack_event is None
            or s.first_pack_event is None
            or s.last_pack_event is None
            or s.last_pack_event > forward_end
            or s.python_free_op >= s.first_unpack_event
        ):
            continue
        producer = graph.ops[s.producer]
        if producer.random or producer.view:
            continue
        end = max([s.producer] + writers.get(s.id, [])) + 1
        if end - s.producer > MAX_SPAN or s.first_pack_event < end:
            continue
        found = _range(graph, s.id, s.producer, end, frozenset())
        if found is None:
            continue
        region = _candidate(graph, s.id, *found, end, writers, None)
        # a checkpoint around the module is excluded by nesting; any other that drops it by itself wins
        if region is not None and not any(
            _drops(graph, r, s.id) for r in regions if not region.path.startswith(r.path + ".")
        ):
            out.append(region)
    chained = _chained(graph, out, writers)
    return tuple(sorted(out + list(chained) + list(_holding(graph, out, chained, writers)), key=forward_order))


def _chained(graph: Graph, short: list[Region], writers: dict[int, list[int]]) -> tuple[Region, ...]:
    """Longer recipes that also rebuild an input another candidate rematerializes, right before them.

    A max-pool's recipe reads the ReLU output it pools; when that output is rematerialized too, holding it
    for the max-pool would undo its own drop. The longer recipe reruns BatchNorm, ReLU and max-pool from
    the convolution output instead. It nests under the short one: a plan takes one of them at most."""
    by_target = {r.target: r for r in short}
    out = []
    for r in short:
        # one longer recipe per tensor (two would both nest under it, and could both drop it), rebuilding
        # every such input made before it
        rebuild = frozenset(x for x in r.input_storages if x in by_target and by_target[x].end_op <= r.first_op)
        found = _range(graph, r.target, r.first_op, r.end_op, rebuild) if rebuild else None
        if found is not None and found[0] < r.first_op:
            ext = _candidate(graph, r.target, *found, r.end_op, writers, r.path)
            if ext is not None:
                out.append(ext)
    return tuple(out)


def _holding(
    graph: Graph, short: list[Region], chained: tuple[Region, ...], writers: dict[int, list[int]]
) -> tuple[Region, ...]:
    """Recipes that hold an input nobody saves instead of rerunning the op that made it, where that op
    costs FLOPs: a U-Net's concatenation of the skip tensor and the transposed convolution's output
    (which nobody saves: the convolution's backward needs its input) drops the concatenation and holds
    the half that the convolution made. Each nests under the tensor's deepest other recipe."""
    deepest = {r.target: r for r in short}
    for r in chained:
        deepest[r.target] = r
    out = []
    for r in short:
        if not any(graph.ops[i].flops for i in r.recipe):
            continue
        producer = graph.storages[r.target].producer
        assert producer is not None  # a recipe's target is made by a forward op
        found = _range(graph, r.target, producer, r.end_op, frozenset(), hold=True)
        held = None if found is None else _candidate(graph, r.target, *found, r.end_op, writers, deepest[r.target].path)
        if held is not None and not any(graph.ops[i].flops for i in held.recipe):
            out.append(held)
    return tuple(out)


def _range(
    graph: Graph, target: int, first: int, end: int, rebuild: frozenset[int], hold: bool = False
) -> tuple[int, tuple[int, ...]] | None:
    """(first op, kept ops) of the recipe of ``target`` ending at ``end``: from ``first`` back over the
    producers of inputs nobody saves, and of those in ``rebuild``; None past MAX_SPAN or MAX_OPS, or
    where it would rerun a random op. ``hold``: an input nobody saves whose maker costs FLOPs is held
    (an input of the recipe) instead."""
    storages = graph.storages
    while True:
        kept = _kept(graph, first, end, target, rebuild)
        rerun = [i for i in range(first, end) if i not in kept]
        made = {x for i in rerun for x in graph.ops[i].allocates}
        earliest = first
        for i in rerun:
            for x in graph.ops[i].inputs:
                st = storages[x]
                if (
                    x in made
                    or st.kind is not StorageKind.ACTIVATION
                    or st.producer is None
                    or (st.saved_by and x not in rebuild)
                    or (hold and graph.ops[st.producer].flops)
                ):
                    continue  # its own, kept anyway (saved by some op), held, or not an activation
                earliest = min(earliest, st.producer)
        if earliest == first:
            break
        if end - earliest > MAX_SPAN:
            return None
        first = earliest
    if len(rerun) > MAX_OPS or any(graph.ops[i].random for i in rerun):
        return None
    return first, kept


def _kept(graph: Graph, first: int, end: int, target: int, rebuild: frozenset[int]) -> tuple[int, ...]:
    """The ops of [first, end) a recipe of ``target`` need not rerun: each makes storages that backward
    keeps anyway (saved by some op), none of them the target or one to rebuild."""
    storages = graph.storages
    return tuple(
        i
        for i in range(first, end)
        if graph.ops[i].allocates
        and all(
            x != target and x not in rebuild and storages[x].kind is StorageKind.ACTIVATION and storages[x].saved_by
            for x in graph.ops[i].allocates
        )
    )


def _candidate(
    graph: Graph,
    target: int,
    first: int,
    kept: tuple[int, ...],
    end: int,
    writers: dict[int, list[int]],
    under: str | None,
) -> Region | None:
    """The rematerialization of ``target`` by ops [first, end) but ``kept``; ``under``: the path of the
    shorter recipe this one extends (its path nests under it)."""
    storages = graph.storages
    rerun = tuple(i for i in range(first, end) if i not in kept)
    made = {s for i in rerun for s in graph.ops[i].allocates}
    inputs: dict[int, None] = {}
    for i in rerun:
        op = graph.ops[i]
        for w in op.mutates:
            if w not in made and storages[w].kind is not StorageKind.BUFFER:
                return None  # writes a tensor from outside: the rerun would write it again
        for x in op.inputs:
            if x in made:
                continue
            later = [w for w in writers.get(x, []) if w >= first]
            if later and (storages[x].kind is not StorageKind.BUFFER or any(w != i for w in later)):
                return None  # read from outside, written later: the rerun would read another value
            inputs[x] = None
    call = anchor(graph, first, end)
    if call is None:
        return None  # a module called more than once, or ops outside every module call (the loss)
    if any(sp.start < call.end_op and call.first_op < sp.end for sp in graph.data_dependent_spans()):
        return None  # ops counted by position in a call whose ops vary with the data (graph.py's NOTE)
    module, offset = call.path, first - call.first_op
    profile = profile_of(graph)
    shared = {  # the call's recipe mode, the model's saved-tensor hook: paid once for every recipe using them
        f"{SHARED_MODE}{module}": profile.remat_visit_ns * (call.end_op - call.first_op),
        SHARED_HOOK: profile.remat_pack_ns * graph.saved_tensors,
    }
    s = storages[target]
    assert s.producer is not None and s.first_unpack_event is not None  # remat_candidates' filter
    # the op's offset in the module call, and which of its outputs when it makes several (max-pool's indices)
    at = f"@{offset}" + (f":{k}" if (k := graph.ops[s.producer].allocates.index(target)) else "")
    if under:  # the module as levels above the shorter recipe's: identical layers fold in the plan file
        levels = len(module_parts(parse_path(under)[0])) - len(module_parts(module))
        path = f"{under}.~{levels}{at}"
    else:
        path = f"{module}.{at}" if module else at
    return Region(
        path=path,
        type_name=TYPE_NAME,
        first_op=first,
        end_op=end,
        recompute_end=end,
        recompute_event=s.first_unpack_event,
        release_event=s.free_event - 1,
        input_storages=tuple(inputs),
        choices=(),
        forced=tuple((i, Forced.KEPT if i in kept else Forced.RECIPE) for i in range(first, end)),
        mutated_buffers=(),
        checkpoint_ns=_overheads(graph, first, end, end, rerun, remat=True)[0],
        target=target,
        kept=kept,
        shared=tuple(sorted((k, ns) for k, ns in shared.items() if ns)),
    )


def anchor(graph: Graph, first: int, end: int) -> ModuleCall | None:
    """The one call of the innermost module that runs ops [first, end): what the run counts a recipe's
    ops in. None when there is no such single call."""
    module = _common_module([graph.ops[i].module for i in range(first, end)])
    own = [m for m in graph.modules if m.path == module]
    if len(own) != 1 or not own[0].first_op <= first < end <= own[0].end_op:
        return None
    return own[0]


def _drops(graph: Graph, region: Region, storage: int) -> bool:
    """Whether checkpointing ``region`` drops ``storage`` by itself (made and saved only inside it)."""
    s = graph.storages[storage]
    return (
        s.producer is not None
        and region.first_op <= s.producer < region.end_op
        and all(region.contains(m) for m in s.saved_by)
    )


def _common_module(paths: list[str]) -> str:
    parts = [p.split(".") if p else [] for p in paths]
    common: list[str] = []
    for names in zip(*parts):
        if any(n != names[0] for n in names):
            break
        common.append(names[0])
    return ".".join(common)
