"""The step a plan is made for: one or more traced graphs (input shapes, routings) and their candidates.

``Shapes`` holds the graphs a CP-SAT model is built over (the same ops at several input shapes) and the
routing variants it is only checked on (graph.py's NOTE [ Data-dependent spans ]); ``simulate`` gives a
plan's worst peak over all of them.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from .errors import InputError
from .graph import Graph
from .solver.regions import Region, candidate_regions, forward_order
from .solver.remat import remat_candidates
from .solver.simulate import SimResult, simulate


class Shapes:
    """The same step traced at one or more input shapes; the largest (by peak) comes first.

    Graphs that run other ops than the largest only inside data-dependent spans (a mixture of experts
    routing another batch: graph.py's NOTE [ Data-dependent spans ]) are ``variants``: the plan is made
    for the others and checked on these by the simulator, so its peak fits every routing traced."""

    def __init__(self, graphs: Graph | Sequence[Graph], *, rematerialize: bool = True) -> None:
        graphs = [graphs] if isinstance(graphs, Graph) else list(graphs)
        if not graphs:
            raise InputError("solve() needs at least one traced graph")
        ordered = sorted(graphs, key=lambda g: -g.baseline_peak_bytes)
        self.primary = ordered[0]
        for g in ordered[1:]:
            if g.signature != self.primary.signature:
                raise InputError(
                    f"the model traced for inputs {list(g.inputs)} is not the one traced for "
                    f"{list(self.primary.inputs)} (parameters or buffers differ: does the factory "
                    "size them from the sequence length? fix the maximum length instead)"
                )
        key = _ops_key(self.primary)
        self.graphs = [g for g in ordered if _ops_key(g) == key]
        self.variants = [g for g in ordered if _ops_key(g) != key]
        self.regions = [candidates(g, rematerialize=rematerialize) for g in self.graphs]
        if len(self.graphs) > 1:  # rematerializations the shapes share (each shape sizes its own)
            shared = set.intersection(
                *({(r.path, r.first_op, r.end_op) for r in regs if r.remat} for regs in self.regions)
            )
            self.regions = [
                tuple(r for r in regs if not r.remat or (r.path, r.first_op, r.end_op) in shared)
                for regs in self.regions
            ]
        ref = self.regions[0]
        for g, regs in zip(self.graphs[1:], self.regions[1:]):
            aligned = [(r.path, r.choices, r.forced, r.recompute_end) for r in regs] == [
                (r.path, r.choices, r.forced, r.recompute_end) for r in ref
            ]
            if not aligned:
                raise InputError(
                    f"inputs {list(g.inputs)} and {list(self.primary.inputs)} run different ops; "
                    "one plan cannot serve both: solve a plan per shape"
                )
        self.variant_regions = []
        for g in self.variants:
            if not g.data_dependent_ops or _stable_key(g) != _stable_key(self.primary):
                raise InputError(
                    f"inputs {list(g.inputs)} and {list(self.primary.inputs)} run different ops "
                    "outside data-dependent routing; one plan cannot serve both: solve a plan per "
                    "shape"
                )
            self.variant_regions.append({r.path: r for r in candidates(g, rematerialize=rematerialize)})

    def simulate(self, saved: dict[str, frozenset[int]]) -> SimResult:
        """The worst peak over the shapes and the routing variants; FLOPs and time of the largest shape."""
        sims = [simulate(g, regs, saved) for g, regs in zip(self.graphs, self.regions)]
        by_path = {r.path: r for r in self.regions[0]}
        for g, own in zip(self.variants, self.variant_regions):
            sims.append(simulate(g, tuple(own.values()), _translate(saved, by_path, own)))
        worst = max(sims, key=lambda r: r.peak_bytes)
        return replace(sims[0], peak_bytes=worst.peak_bytes, peak_at=worst.peak_at)


def _ops_key(g: Graph) -> list[tuple[str, str]]:
    return [(o.name, o.module) for o in g.ops]


def _stable_key(g: Graph) -> list[tuple[str, str]]:
    """The ops outside data-dependent spans, which every routing runs alike."""
    inside = {i for sp in g.data_dependent_spans() for i in range(sp.start, sp.end)}
    return [(o.name, o.module) for o in g.ops if o.index not in inside]


def _translate(
    saved: dict[str, frozenset[int]], ref: dict[str, Region], own: dict[str, Region]
) -> dict[str, frozenset[int]]:
    """A plan's decisions for another routing's graph: an op a region saves sits before the region's
    data-dependent ops, at the same offset from the region's first op. A decision the other graph has no
    candidate for (or no such op) is left out: that graph is checked as the plan runs it there."""
    out = {}
    for path, ops in saved.items():
        r, o = ref.get(path), own.get(path)
        if r is None or o is None:
            continue
        moved = frozenset(o.first_op + (i - r.first_op) for i in ops)
        if moved <= set(o.choices) | set(o.kept):
            out[path] = moved
    return out


def candidates(graph: Graph, *, rematerialize: bool = True) -> tuple[Region, ...]:
    """What a plan may decide: the checkpoint candidates and (unless ``rematerialize`` is False) the
    rematerializations, in forward order."""
    regions = candidate_regions(graph)
    if not rematerialize:
        return regions
    return tuple(sorted(regions + remat_candidates(graph, regions), key=forward_order))
