"""Independent checker: replays a step with a plan and reports its peak memory and recompute cost.

It shares no code with the CP-SAT model. Given concrete decisions it lays every storage's lifetime
out on a timeline of *positions* (one per traced event, plus one per op rerun when a checkpointed
region is recomputed just before the backward event that first needs it) and sweeps it.

Lifetimes under a plan, for a storage allocated by op ``p`` of checkpointed region ``r``:

* saved for backward only by ops of ``r``, ``p`` not saved by the plan: alive while Python holds it in
  forward (the trace's lifetime pass), then again from ``p``'s rerun until its baseline release;
* saved by the plan (cached by selective checkpointing): its baseline lifetime, at least until the
  rerun consumes the cached value;
* not saved for backward: its baseline lifetime, plus its Python lifetime inside the rerun;
* the region's inputs: held by the checkpoint until the region's last unpack.

A rematerialization (remat.py) drops its target from Python's last use in forward to the rerun of its
recipe (its ops but the kept ones), just before the target's first unpack; the rerun's other outputs, and
the copies of the buffers it writes, live until the rerun ends, and its inputs are held until the
target's last unpack, like a checkpoint's.

Everything else keeps the lifetime the trace observed.

The cost is the estimated time of every op rerun, plus each checkpointed region's own overhead: the
checkpoint call, and selective checkpointing's dispatch modes where the region saves any op; plus, once
each, the costs regions share (``Region.shared``: a recipe mode, the saved-tensor hook).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from ..graph import Graph, StorageKind
from .regions import Region


@dataclass(frozen=True, slots=True, kw_only=True)
class SimResult:
    peak_bytes: int
    peak_at: str  # where the peak happens, for humans
    extra_forward_flops: int
    extra_cost_ns: int  # ops rerun, checkpoint calls and dispatch modes (costmodel.py)
    recomputed_ops: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Lifetimes:
    """Every storage's lifetime under a plan, on the timeline of positions, and the plan's costs."""

    labels: tuple[str, ...]  # what happens at each position
    intervals: dict[int, list[tuple[int, int]]]  # storage -> [lo, hi) positions it is alive (may overlap)
    copies: tuple[tuple[int, int, int], ...]  # (from, to, bytes) of buffer copies a recipe's rerun writes
    extra_forward_flops: int
    extra_cost_ns: int
    recomputed_ops: int


def simulate(graph: Graph, regions: tuple[Region, ...], saved: Mapping[str, frozenset[int]]) -> SimResult:
    """Peak memory and recompute cost of checkpointing ``saved``'s regions, caching the ops listed."""
    life = lifetimes(graph, regions, saved)
    peak, peak_pos = _sweep(graph, life)
    return SimResult(
        peak_bytes=peak,
        peak_at=life.labels[peak_pos] if life.labels else "",
        extra_forward_flops=life.extra_forward_flops,
        extra_cost_ns=life.extra_cost_ns,
        recomputed_ops=life.recomputed_ops,
    )


def alive_at_peak(
    graph: Graph, regions: tuple[Region, ...], saved: Mapping[str, frozenset[int]]
) -> tuple[SimResult, list[int], int]:
    """``simulate``'s result, the storages alive at its peak (by id), and the bytes of the buffer copies
    alive there: with the optimizer state and the fixed bytes, they sum to the peak exactly."""
    life = lifetimes(graph, regions, saved)
    peak, pos = _sweep(graph, life)
    sim = SimResult(
        peak_bytes=peak,
        peak_at=life.labels[pos] if life.labels else "",
        extra_forward_flops=life.extra_forward_flops,
        extra_cost_ns=life.extra_cost_ns,
        recomputed_ops=life.recomputed_ops,
    )
    if not life.labels:
        return sim, [], 0
    alive = [s.id for s in graph.storages if any(lo <= pos < hi for lo, hi in _union(life.intervals[s.id]))]
    copies = sum(nbytes for lo, hi, nbytes in life.copies if lo <= pos < hi)
    return sim, alive, copies


def _sweep(graph: Graph, life: Lifetimes) -> tuple[int, int]:
    """(peak bytes, the first position it is reached) of the lifetimes, optimizer state and fixed bytes in."""
    n = len(life.labels)
    delta = [0] * (n + 1)
    for s in graph.storages:
        for lo, hi in _union(life.intervals[s.id]):
            delta[lo] += s.nbytes
            delta[hi] -= s.nbytes
    for lo, hi, nbytes in life.copies:
        delta[lo] += nbytes
        delta[hi] -= nbytes
    fixed = graph.optimizer_state_bytes + graph.extra_fixed_bytes
    live, peak, peak_pos = fixed, -1, 0
    for pos in range(n):
        live += delta[pos]
        if live > peak:
            peak, peak_pos = live, pos
    return max(peak, fixed), peak_pos


def lifetimes(graph: Graph, regions: tuple[Region, ...], saved: Mapping[str, frozenset[int]]) -> Lifetimes:
    """Lay out every storage's lifetime under the plan ``saved`` (see the module's docstring)."""
    by_path = {r.path: r for r in regions}
    unknown = sorted(set(saved) - set(by_path))
    if unknown:
        raise ValueError(f"plan names regions that are not candidates: {unknown}")
    active = sorted((by_path[p] for p in saved), key=lambda r: -r.first_op)
    for a in active:
        for b in active:
            if b.path.startswith(a.path + "."):
                raise ValueError(f"plan checkpoints {a.path} and {b.path} inside it; regions must not nest")

    # ---- the timeline: reruns are inserted before the backward event that triggers them ----
    reruns_at: dict[int, list[Region]] = {}
    for r in active:
        reruns_at.setdefault(r.recompute_event, []).append(r)
    labels: list[str] = []
    first_pos, sample_pos = [0] * (graph.num_events + 1), [0] * graph.num_events
    rerun_pos: dict[tuple[str, int], int] = {}
    rerun_end: dict[str, int] = {}
    for e in range(graph.num_events):
        first_pos[e] = len(labels)
        for r in reruns_at.get(e, ()):
            for i in range(r.first_op, r.recompute_end):
                rerun_pos[(r.path, i)] = len(labels)
                labels.append(f"recompute of {r.path} (op {i} {graph.ops[i].name})")
            rerun_end[r.path] = len(labels)
        sample_pos[e] = len(labels)
        labels.append(_event_label(graph, e))
    first_pos[graph.num_events] = len(labels)

    def start(alloc: int) -> int:
        return 0 if alloc < 0 else sample_pos[alloc]

    intervals: dict[int, list[tuple[int, int]]] = {
        s.id: [(start(s.alloc_event), first_pos[s.free_event])] for s in graph.storages
    }

    extra_flops = extra_cost = recomputed = 0
    copies: list[tuple[int, int, int]] = []  # (from, to, bytes) of buffer copies a recipe's rerun writes
    dropped: dict[int, str] = {}  # storage -> the region whose plan drops it (never two)

    def drop(sid: int, path: str) -> None:
        if sid in dropped:
            raise ValueError(f"plan drops storage {sid} twice: with {dropped[sid]} and with {path}")
        dropped[sid] = path

    for r in active:
        if r.remat:  # a recipe rerun once before the first unpack of its target (remat.py)
            s = graph.storages[r.target]
            assert s.producer is not None  # a recipe's target is made by a forward op (remat.py)
            drop(s.id, r.path)
            extra_cost += r.checkpoint_ns
            for p in r.recipe:
                extra_flops += graph.ops[p].flops
                extra_cost += graph.ops[p].cost_ns
                recomputed += 1
                for sid in graph.ops[p].allocates:
                    if sid != s.id:  # the rerun's own copies, alive until it ends
                        intervals[sid].append((rerun_pos[(r.path, p)], rerun_end[r.path]))
                for sid in graph.ops[p].mutates:
                    if graph.storages[sid].kind is StorageKind.BUFFER:  # written to a copy (the statistics)
                        copies.append((rerun_pos[(r.path, p)], rerun_end[r.path], graph.storages[sid].nbytes))
            intervals[s.id] = [
                (start(s.alloc_event), first_pos[s.python_free_op]),
                (rerun_pos[(r.path, s.producer)], first_pos[s.free_event]),
            ]
            continue
        keep = saved[r.path]
        extra_cost += r.checkpoint_ns + (r.selective_ns if keep else 0)
        inside = set(r.ops)
        done = rerun_end[r.path]
        for p in r.ops:
            op = graph.ops[p]
            rerun = p < r.recompute_end
            if rerun and p not in keep:
                extra_flops += op.flops
                extra_cost += op.cost_ns
                recomputed += 1
            for sid in op.allocates:
                s = graph.storages[sid]
                alloc, free = start(s.alloc_event), first_pos[s.free_event]
                py_end = first_pos[s.python_free_op]
                if s.saved_by and all(r.contains(m) for m in s.saved_by):
                    if p in keep:
                        intervals[sid] = [(alloc, max(free, rerun_pos[(r.path, p)] + 1))]
                    else:
                        drop(sid, r.path)
                        again = rerun_pos[(r.path, p)] if rerun else free
                        intervals[sid] = [(alloc, py_end), (again, free)]
                elif not s.saved_by and rerun:
                    inner_end = (
                        rerun_pos[(r.path, s.python_free_op)]
                        if s.python_free_op in inside and s.python_free_op < r.recompute_end
                        else done
                    )
                    transient = (rerun_pos[(r.path, p)], max(inner_end, rerun_pos[(r.path, p)] + 1))
                    if p in keep:  # the cache holds it until the rerun takes it back
                        intervals[sid] = [(alloc, max(free, transient[1]))]
                    else:
                        intervals[sid] = [(alloc, free), transient]
    # Costs the regions share (a recipe mode over a module call, the saved-tensor hook): paid once each.
    shared: dict[str, int] = {}
    for r in active:
        for key, ns in r.shared:
            shared[key] = max(ns, shared.get(key, 0))
    extra_cost += sum(shared.values())
    # A checkpoint holds its region's inputs until its last unpack, whoever else holds them.
    for r in active:
        release = first_pos[min(r.release_event + 1, graph.num_events)]
        for sid in r.input_storages:
            intervals[sid].append((start(graph.storages[sid].alloc_event), release))

    return Lifetimes(
        labels=tuple(labels),
        intervals=intervals,
        copies=tuple(copies),
        extra_forward_flops=extra_flops,
        extra_cost_ns=extra_cost,
        recomputed_ops=recomputed,
    )


def _event_label(graph: Graph, e: int) -> str:
    if e < graph.num_forward:
        op = graph.ops[e]
        return f"forward op {e} {op.name} in {op.module or '<root>'}"
    return f"backward event {e - graph.num_forward}"


def _union(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge overlapping [lo, hi) spans: a storage alive twice over is counted once."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(x for x in spans if x[1] > x[0]):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out
