"""The memory rows' ingredients: positions on the step's timeline and every way a decision changes memory.

1. ``Timeline``: positions (one per traced event, one per op rerun of every candidate region just
   before the backward event that triggers its recomputation) and the baseline live bytes at each.
2. ``terms``: every way a decision changes memory, as (bytes, literal expression, [lo, hi) positions).

formulation.py turns them into CP-SAT's memory constraints.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from ..graph import Graph, StorageKind
from .regions import Region


@dataclass(frozen=True, slots=True)
class Evaluation:
    """One plan in the model's terms."""

    rows: list[int]  # every memory row's value (model units)
    cost: int  # estimated recompute time (ns)
    values: dict[int, int]  # every CP-SAT variable's value (by proto index): a complete hint
    # each region's steady aggregate g (largest input shape): what it holds, less what it frees, from its
    # forward to its recomputation; 0 for a region not checkpointed
    steady: list[int]

    @property
    def worst(self) -> int:
        """The highest row (the first of them on a tie)."""
        return max(range(len(self.rows)), key=lambda i: (self.rows[i], -i))


class TermKind(str, Enum):
    """The literal a memory term is active under."""

    RECOMPUTED = "x"  # op p is recomputed (c - k)
    SAVED = "k"  # op p is saved
    CHECKPOINTED = "c"  # the region is checkpointed
    HELD = "z"  # op p is recomputed and region ``other`` is checkpointed (it holds the storage)
    HELD_FORCED = "zc"  # the same for a forced op (c and c')


@dataclass(frozen=True, slots=True)
class Term:
    region: int  # index into regions
    nbytes: int  # > 0 adds memory, < 0 frees it
    kind: TermKind
    op: int  # the op p (or -1 for kind "c")
    other: int  # for kind "z": the region whose checkpoint holds the storage
    lo: int
    hi: int
    # part of the region's steady contribution between its forward and its recomputation: rows where all
    # of a region's steady terms are active count them as one aggregate, g[j]
    gap: bool


class Timeline:
    """Positions and baseline memory. Reruns of every candidate region are given positions."""

    def __init__(self, graph: Graph, regions: tuple[Region, ...]) -> None:
        at: dict[int, list[Region]] = {}
        for r in sorted(regions, key=lambda r: -r.first_op):
            at.setdefault(r.recompute_event, []).append(r)
        self.first = [0] * (graph.num_events + 1)
        self.sample = [0] * graph.num_events
        self.rerun: dict[tuple[str, int], int] = {}
        self.rerun_end: dict[str, int] = {}
        base_at: list[int] = []  # the event whose baseline memory a position sees
        n = 0
        for e in range(graph.num_events):
            self.first[e] = n
            for r in at.get(e, ()):
                for i in range(r.first_op, r.recompute_end):
                    self.rerun[(r.path, i)] = n
                    base_at.append(-(e + 1))  # between events e-1 and e: frees of e done, allocs not
                    n += 1
                self.rerun_end[r.path] = n
            self.sample[e] = n
            base_at.append(e)
            n += 1
        self.first[graph.num_events] = n
        self.size = n
        timeline = graph.memory_timeline()
        freed_at = [0] * (graph.num_events + 1)
        for s in graph.storages:
            if 0 <= s.free_event < graph.num_events and s.free_event > max(s.alloc_event, 0):
                freed_at[s.free_event] += s.nbytes
        self.base = []
        for b in base_at:
            if b >= 0:
                self.base.append(timeline[b])
            else:
                e = -b - 1
                prev = timeline[e - 1] if e > 0 else timeline[0]
                self.base.append(prev - freed_at[e])

    def start(self, alloc: int) -> int:
        return 0 if alloc < 0 else self.sample[alloc]


def terms(graph: Graph, regions: tuple[Region, ...], tl: Timeline) -> list[Term]:
    """Every memory effect of every decision, with the positions where it applies."""
    terms: list[Term] = []
    input_of: dict[int, list[int]] = {}
    for j, r in enumerate(regions):
        for sid in r.input_storages:
            input_of.setdefault(sid, []).append(j)
    for j, r in enumerate(regions):
        inside = set(r.ops)
        forced = dict(r.forced)
        if r.remat:
            terms.extend(remat_terms(graph, j, r, regions, tl, input_of))
        for p in () if r.remat else r.ops:
            op = graph.ops[p]
            rerun = p < r.recompute_end
            x = TermKind.CHECKPOINTED if p in forced else TermKind.RECOMPUTED
            for sid in op.allocates:
                s = graph.storages[sid]
                free = tl.first[s.free_event]
                py_end = tl.first[s.python_free_op]
                if s.saved_by and all(r.contains(m) for m in s.saved_by) and rerun:
                    again = tl.rerun[(r.path, p)]
                    # freed after its Python lifetime, rebuilt by the rerun
                    terms.append(Term(j, -s.nbytes, x, p, -1, py_end, again, True))
                    for k in input_of.get(sid, ()):
                        if k != j:  # ... unless the next region's checkpoint holds it as an input
                            release = tl.first[min(regions[k].release_event + 1, graph.num_events)]
                            held = TermKind.HELD if x is TermKind.RECOMPUTED else TermKind.HELD_FORCED
                            terms.append(Term(j, s.nbytes, held, p, k, py_end, min(release, again), True))
                elif not s.saved_by and rerun:
                    at = tl.rerun[(r.path, p)]
                    inner = (
                        tl.rerun[(r.path, s.python_free_op)]
                        if s.python_free_op in inside and s.python_free_op < r.recompute_end
                        else tl.rerun_end[r.path]
                    )
                    # alive inside the rerun while Python holds it (cached or not)
                    terms.append(Term(j, s.nbytes, TermKind.CHECKPOINTED, -1, -1, at, max(inner, at + 1), False))
                    if x is TermKind.RECOMPUTED:  # a saved op's output stays in the cache until the rerun takes it
                        terms.append(Term(j, s.nbytes, TermKind.SAVED, p, -1, free, at, True))
        release = tl.first[min(r.release_event + 1, graph.num_events)]
        for sid in r.input_storages:
            s = graph.storages[sid]
            # the checkpoint holds its inputs until its last unpack
            terms.append(Term(j, s.nbytes, TermKind.CHECKPOINTED, -1, -1, tl.first[s.free_event], release, True))
    return [t for t in terms if t.hi > t.lo]


def remat_terms(
    graph: Graph, j: int, r: Region, regions: tuple[Region, ...], tl: Timeline, input_of: dict[int, list[int]]
) -> list[Term]:
    """A rematerialization's memory effects (remat.py): its target dropped from Python's last use to the
    rerun of its producer, unless another region holds it as an input; the rerun's other outputs alive
    until the rerun ends."""
    s = graph.storages[r.target]
    assert s.producer is not None  # a recipe's target is made by a forward op (remat.py)
    py_end, again = tl.first[s.python_free_op], tl.rerun[(r.path, s.producer)]
    terms = [Term(j, -s.nbytes, TermKind.CHECKPOINTED, -1, -1, py_end, again, True)]
    for k in input_of.get(s.id, ()):
        if k != j:  # a checkpoint (or another recipe) that holds it as an input keeps it alive
            release = tl.first[min(regions[k].release_event + 1, graph.num_events)]
            terms.append(Term(j, s.nbytes, TermKind.HELD_FORCED, s.producer, k, py_end, min(release, again), True))
    for p in r.recipe:
        op = graph.ops[p]
        copies = [x for x in op.mutates if graph.storages[x].kind is StorageKind.BUFFER]
        for sid in [x for x in op.allocates if x != s.id] + copies:
            # the rerun's copies of the other outputs (BatchNorm's batch statistics) and of the buffers it
            # writes (the running statistics), alive until the rerun ends
            terms.append(
                Term(
                    j,
                    graph.storages[sid].nbytes,
                    TermKind.CHECKPOINTED,
                    -1,
                    -1,
                    tl.rerun[(r.path, p)],
                    tl.rerun_end[r.path],
                    False,
                )
            )
    return terms
