"""Candidate regions: the module calls a plan may checkpoint, and what each op inside may do.

A region is one module call that ``torch.utils.checkpoint`` can wrap: called once in the step, with
ops of its own and tensors saved for backward. A plan never checkpoints two nested regions, but the
candidates come at three granularities so the solver can choose: the frontier, found by walking
the module tree: the elements of every container (``ModuleList``, ``Sequential``, ``ModuleDict``) are
regions (transformer blocks, ResNet blocks); modules beside containers are regions too (embeddings,
final norm, head); a module with no container below it is one region; and below a frontier module, the
blocks of any stack of repeated blocks, at any depth (a Swin stage's blocks). Then the frontier's ancestors
(coarser: a whole ResNet stage, a U-Net level) and its children (finer: attention and MLP of a block).

Inside a region, each op is either free to be saved (its outputs cached by selective checkpointing)
or forced to be recomputed, with the reason recorded for the plan file.

Each region also carries what checkpointing it costs beyond the ops it reruns (costmodel.py): the
checkpoint call itself, and the dispatch modes of selective checkpointing when it saves any op.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..costmodel import profile_of
from ..graph import CONTAINERS, Forced, Graph, StorageKind


@dataclass(frozen=True, slots=True, kw_only=True)
class Region:
    path: str
    type_name: str
    first_op: int
    end_op: int  # one past the last op
    recompute_end: int  # recomputation reruns ops [first_op, recompute_end) (early stop)
    recompute_event: int  # backward event at which the recomputation runs
    release_event: int  # backward event of the last unpack: the checkpoint frame dies after it
    input_storages: tuple[int, ...]
    choices: tuple[int, ...]  # ops that may be saved
    forced: tuple[tuple[int, Forced], ...]  # (op, reason) for every other op of the region
    mutated_buffers: tuple[str, ...]  # buffers written in forward (BatchNorm statistics): restored on recompute
    # a segment of consecutive blocks checkpointed as one unit (``segment``): the module calls it runs;
    # empty for a module call, which is its own path
    members: tuple[str, ...] = ()
    checkpoint_ns: int = 0  # estimated time of checkpointing it at all, beyond the ops it reruns
    selective_ns: int = 0  # estimated time selective checkpointing's dispatch modes add, when they run
    # a rematerialization (``remat_candidates``): the storage it drops after forward and rebuilds at its
    # first unpack by rerunning ops [first_op, end_op) but ``kept``; -1 for a checkpointed module call
    target: int = -1
    kept: tuple[int, ...] = ()  # a rematerialization's ops it does not rerun (Forced.KEPT)
    # (key, ns): costs a plan pays once for each key, however many of its regions carry it (a recipe mode
    # over a module call, the saved-tensor hook of every rematerialization); sorted by key
    shared: tuple[tuple[str, int], ...] = ()

    @property
    def remat(self) -> bool:
        return self.target >= 0

    def __post_init__(self) -> None:
        if not self.first_op <= self.recompute_end <= self.end_op:
            raise ValueError(f"region {self.path}: recompute_end outside the region's ops")

    @property
    def ops(self) -> range:
        return range(self.first_op, self.end_op)

    @property
    def recipe(self) -> tuple[int, ...]:
        """The ops a rematerialization reruns: its ops but the kept ones."""
        return tuple(i for i in self.ops if i not in self.kept)

    def contains(self, module_path: str) -> bool:
        if not self.members:  # a module call (the hot path: the solver and simulator ask per storage)
            return module_path == self.path or module_path.startswith(self.path + ".")
        return any(module_path == p or module_path.startswith(p + ".") for p in self.members)


def candidate_regions(graph: Graph) -> tuple[Region, ...]:
    """The checkpointable module calls of ``graph``, in forward order (outer before inner)."""
    types = dict(graph.module_tree)
    multi = {m.path for m in graph.modules if m.call_index > 0}
    children: dict[str, list[str]] = {}
    for path in types:
        if path:
            children.setdefault(path.rsplit(".", 1)[0] if "." in path else "", []).append(path)
    frontier: list[str] = []

    def has_container(path: str) -> bool:
        return any(types[c] in CONTAINERS or has_container(c) for c in children.get(path, ()))

    def walk(path: str) -> None:
        if types[path] in CONTAINERS or has_container(path) or path == "":
            for c in children.get(path, ()):
                if types[path] in CONTAINERS and types[c] not in CONTAINERS:
                    frontier.append(c)
                else:
                    walk(c)
        else:
            frontier.append(path)

    def repeated(path: str) -> list[str]:
        """The blocks of every container below ``path``, at any depth, that repeats a block (two elements
        or more of one type), and the blocks below those: a Swin stage's ``blocks.M`` under the stages'
        ``layers.N``, which is what Hugging Face's own checkpointing wraps. A container of unlike modules
        (a ResNet block's ``downsample``: a convolution and a norm) is no stack of blocks."""
        out = []
        for c in children.get(path, ()):
            if types[c] in CONTAINERS:
                blocks = [e for e in children.get(c, ()) if types[e] not in CONTAINERS]
                kinds = [types[e] for e in blocks]
                if any(kinds.count(k) > 1 for k in kinds):
                    out += [p for e in blocks for p in (e, *repeated(e))]
                    continue
            out += repeated(c)
        return out

    if "" in types:
        walk("")
    frontier += [p for path in list(frontier) for p in repeated(path)]
    # Candidates at three granularities; the solver picks, never two nested ones (see formulation.py).
    paths = set(frontier)
    for path in frontier:
        paths.update(a for a in _ancestors(path))
        paths.update(children.get(path, ()))
    regions = []
    for path in paths:
        if path in multi or any(p in multi for p in _ancestors(path)):
            continue  # a shared module runs twice: one checkpoint per call is not expressible
        region = _make_region(graph, path)
        if region is not None:
            regions.append(region)
    return tuple(sorted(regions, key=forward_order))


def forward_order(r: Region) -> tuple[int, int, str]:
    """Sort key of candidates: forward order, outer before inner."""
    return r.first_op, -r.end_op, r.path


def segment(graph: Graph, parts: tuple[Region, ...]) -> Region | None:
    """Consecutive blocks checkpointed as one unit, as ``checkpoint_sequential`` does (Chen's sqrt(n)).

    Not a module call, so never a plan's decision: the baselines use it to predict that policy. One
    checkpoint holds the first block's inputs (and whatever later blocks take from outside), reruns
    every block at the first unpack of any of them, and dies after the last. None unless the blocks are
    one chain: back to back (no op of the parent between them, which the segment would not rerun), each
    taking a tensor the previous one made.
    """
    if not parts:
        return None
    for a, b in zip(parts, parts[1:]):
        made = (graph.storages[s].producer for s in b.input_storages)
        if a.end_op != b.first_op or not any(p is not None and a.first_op <= p < a.end_op for p in made):
            return None
    first, last = parts[0], parts[-1]
    inside = range(first.first_op, last.end_op)
    made_inside = {s for i in inside for s in graph.ops[i].allocates}
    inputs = dict.fromkeys(s for r in parts for s in r.input_storages if s not in made_inside)
    return Region(
        path=f"{first.path}..{last.path}",
        type_name="segment",
        first_op=first.first_op,
        end_op=last.end_op,
        recompute_end=max(r.recompute_end for r in parts),
        recompute_event=min(r.recompute_event for r in parts),
        release_event=max(r.release_event for r in parts),
        input_storages=tuple(inputs),
        choices=tuple(p for r in parts for p in r.choices),
        forced=tuple(x for r in parts for x in r.forced),
        mutated_buffers=tuple(sorted({b for r in parts for b in r.mutated_buffers})),
        members=tuple(r.path for r in parts),
        checkpoint_ns=_overheads(graph, first.first_op, last.end_op, max(r.recompute_end for r in parts))[0],
    )


def outermost(regions: tuple[Region, ...]) -> tuple[Region, ...]:
    """The checkpoint candidates no other candidate contains: "full checkpointing" checkpoints these."""
    return tuple(r for r in regions if not r.remat and not any(r.path.startswith(o.path + ".") for o in regions))


def nested_pairs(regions: tuple[Region, ...]) -> list[tuple[int, int]]:
    """(outer, inner) index pairs of candidates where one module contains the other."""
    return [
        (a, b)
        for a, ra in enumerate(regions)
        for b, rb in enumerate(regions)
        if a != b and rb.path.startswith(ra.path + ".")
    ]


def _ancestors(path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _make_region(graph: Graph, path: str) -> Region | None:
    call = next((m for m in graph.modules if m.path == path and m.call_index == 0), None)
    if call is None or call.first_op >= call.end_op or call.first_unpack_event is None:
        return None
    names = dict(graph.tensor_names)
    storages = graph.storages
    inside = set(range(call.first_op, call.end_op))
    mutated_by_later: dict[int, int] = {}  # storage -> first op writing it in place
    for op in graph.ops:
        for s in op.mutates:
            mutated_by_later.setdefault(s, op.index)
    mutated_buffers = []
    for i in inside:
        for s in graph.ops[i].mutates:
            st = storages[s]
            if st.kind is StorageKind.BUFFER:
                mutated_buffers.append(names.get(s, f"storage{s}"))
            elif st.producer is None or st.producer not in inside:
                return None  # writes a tensor from outside: recomputing would write it twice
    if not _saves_internal(graph, call.path, inside):
        return None
    # NOTE [ Data-dependent spans ] (graph.py): a call run inside a span (an expert's module in the loop) is
    # called as often as the data says; one around a span has its ops from the span's first op on forced
    spans = graph.data_dependent_spans()
    if any(sp.start <= call.first_op < sp.end and _strictly_inside(call.path, sp.owner) for sp in spans):
        return None
    varies = min((sp.start for sp in spans if call.first_op <= sp.start < call.end_op), default=call.end_op)
    end = call.recompute_end_op
    choices, forced = [], []
    for i in range(call.first_op, call.end_op):
        op = graph.ops[i]
        if i >= varies:
            forced.append((i, Forced.DATA_DEPENDENT))
        elif i >= end:
            forced.append((i, Forced.AFTER_LAST_SAVE))
        elif op.view:
            forced.append((i, Forced.VIEW))
        elif op.random:
            forced.append((i, Forced.RANDOM))
        elif op.mutates or any(s in mutated_by_later for s in op.allocates):
            forced.append((i, Forced.INPLACE))
        elif not op.allocates or all(storages[s].nbytes == 0 for s in op.allocates):
            forced.append((i, Forced.NO_OUTPUT))
        else:
            choices.append(i)
    checkpoint_ns, selective_ns = _overheads(graph, call.first_op, call.end_op, end)
    assert call.last_unpack_event is not None  # set with first_unpack_event, checked above
    return Region(
        path=call.path,
        type_name=call.type_name,
        first_op=call.first_op,
        end_op=call.end_op,
        recompute_end=end,
        recompute_event=call.first_unpack_event,
        release_event=call.last_unpack_event,
        input_storages=call.input_storages,
        choices=tuple(choices),
        forced=tuple(forced),
        mutated_buffers=tuple(sorted(set(mutated_buffers))),
        checkpoint_ns=checkpoint_ns,
        selective_ns=selective_ns,
    )


def _strictly_inside(path: str, owner: str) -> bool:
    """Whether module ``path`` is a submodule of ``owner`` ('' is the root)."""
    return path != owner and (owner == "" or path.startswith(owner + "."))


def _overheads(
    graph: Graph, first: int, end: int, recompute_end: int, rerun: tuple[int, ...] | None = None, *, remat: bool = False
) -> tuple[int, int]:
    """(checkpointing ops [first, end) at all, selective checkpointing on top): costmodel.region_ns.
    ``rerun``: the ops the recomputation runs, when not all of [first, recompute_end); ``remat``: the
    ops are a rematerialization's recipe."""
    profile = profile_of(graph)
    rerun = tuple(range(first, recompute_end)) if rerun is None else rerun
    device = sum(profile.device_ns(graph.ops[i].cost_ns) for i in range(first, end)) + sum(
        profile.device_ns(graph.ops[i].cost_ns) for i in rerun
    )
    return profile.region_ns(num_ops=end - first, num_rerun=len(rerun), device_ns=device, remat=remat)


def _saves_internal(graph: Graph, path: str, inside: set[int]) -> bool:
    for i in inside:
        for s in graph.ops[i].allocates:
            st = graph.storages[s]
            if st.saved_by and all(p == path or p.startswith(path + ".") for p in st.saved_by):
                return True
    return False
