"""What makes the peak: the memory alive at a step's peak, by kind and by module, with or without a plan.

Built on the simulator's own lifetimes (``solver.simulate.alive_at_peak``), so the parts sum to the peak the
plan predicts, to the byte. Like PyTorch's MemTracker, it splits the peak into parameters, gradients,
optimizer state, activations and the rest; activations are split further by the module whose op made them,
identical layers folded (``h.{0-11}.attn``) and listed in model order.

Known limitations: an activation is charged to the innermost module that ran the op allocating it (a view's
storage to the op that made the storage); a plan traced at several sequence lengths is explained at the one
traced here.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Mapping

from .graph import Graph, StorageKind
from .names import fold_names
from .plan import Plan
from .solver.regions import Region
from .solver.simulate import alive_at_peak


class Kind(str, Enum):
    """What a byte alive at the peak is (MemTracker's categories, as a user names them)."""

    PARAMETERS = "parameters"
    GRADIENTS = "gradients"
    OPTIMIZER = "optimizer state"
    ACTIVATIONS = "activations"
    BACKWARD = "backward temporaries"  # gradients of activations and other tensors backward makes
    INPUTS = "inputs"
    BUFFERS = "buffers"  # module buffers (BatchNorm statistics), and their copies a rerun writes
    FIXED = "workspace and fixed"  # cuBLAS workspace, DDP buckets, FSDP all-gather buffers

    @classmethod
    def of(cls, kind: StorageKind) -> Kind:
        return _KINDS[kind]


_KINDS = {
    StorageKind.PARAM: Kind.PARAMETERS,
    StorageKind.GRAD: Kind.GRADIENTS,
    StorageKind.BUFFER: Kind.BUFFERS,
    StorageKind.INPUT: Kind.INPUTS,
    StorageKind.ACTIVATION: Kind.ACTIVATIONS,
    StorageKind.BACKWARD: Kind.BACKWARD,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class ModuleRow:
    """Activations alive at the peak made by one module, or by a group of identical layers."""

    label: str  # "transformer.h.{0-11}.attn", "<root>" for ops outside any module (the loss)
    modules: int  # how many modules the row folds
    nbytes: tuple[int, ...]  # bytes of each breakdown the row compares


@dataclass(frozen=True, slots=True, kw_only=True)
class Tensor:
    """One storage alive at the peak."""

    kind: Kind
    name: str  # the parameter's name, or the op and module that made it
    shape: str  # "4x64x128" ("" when unknown)
    dtype: str
    nbytes: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Breakdown:
    peak_bytes: int
    peak_at: str  # where the peak happens (the simulator's label)
    by_kind: tuple[tuple[Kind, int], ...]  # every kind, in Kind's order; the bytes sum to peak_bytes
    by_module: tuple[tuple[str, int], ...]  # activations by module path, in model order (no zeros)
    largest: tuple[Tensor, ...]  # the largest storages alive at the peak, largest first

    def __post_init__(self) -> None:
        total = sum(b for _, b in self.by_kind)
        if total != self.peak_bytes:
            raise ValueError(f"by_kind sums to {total} bytes, not the peak {self.peak_bytes}")


def breakdown(
    graph: Graph,
    regions: tuple[Region, ...],
    saved: Mapping[str, frozenset[int]],
    *,
    depth: int | None = None,
    top: int = 10,
) -> Breakdown:
    """The peak of checkpointing ``saved``'s regions (as ``simulate`` takes them), split by kind and module.

    ``depth`` cuts module paths to that many components (``transformer.h.3`` at 3) before folding; ``top``
    is how many of the largest storages to list.
    """
    sim, alive, copies = alive_at_peak(graph, regions, saved)
    kinds = dict.fromkeys(Kind, 0)
    kinds[Kind.OPTIMIZER] = graph.optimizer_state_bytes
    kinds[Kind.FIXED] = graph.extra_fixed_bytes
    kinds[Kind.BUFFERS] += copies
    per_module: dict[str, int] = {}
    for sid in alive:
        s = graph.storages[sid]
        kinds[Kind.of(s.kind)] += s.nbytes
        if s.kind is StorageKind.ACTIVATION and s.producer is not None:
            module = _cut(graph.ops[s.producer].module, depth)
            per_module[module] = per_module.get(module, 0) + s.nbytes
    order, last = _model_order(graph, depth), (len(graph.ops), 0)
    return Breakdown(
        peak_bytes=sim.peak_bytes,
        peak_at=sim.peak_at,
        by_kind=tuple(kinds.items()),
        by_module=tuple(sorted(per_module.items(), key=lambda kv: (order.get(kv[0], last), kv[0]))),
        largest=tuple(
            _tensor(graph, sid) for sid in sorted(alive, key=lambda i: (-graph.storages[i].nbytes, i))[: max(top, 0)]
        ),
    )


def explain(
    graph: Graph, plan: Plan | None = None, *, depth: int | None = None, top: int = 10
) -> tuple[Breakdown, Breakdown | None]:
    """The breakdown without checkpointing and (given a plan for ``graph``) with the plan's decisions."""
    from .decisions import plan_decisions
    from .shapes import candidates  # the solver's candidates (no OR-Tools import)

    if plan is None:
        return breakdown(graph, candidates(graph), {}, depth=depth, top=top), None
    regions, saved = plan_decisions(graph, plan)
    return (breakdown(graph, regions, {}, depth=depth, top=top), breakdown(graph, regions, saved, depth=depth, top=top))


def _cut(module: str, depth: int | None) -> str:
    return ".".join(module.split(".")[:depth]) if depth is not None and module else module


def _model_order(graph: Graph, depth: int | None) -> dict[str, tuple[int, int]]:
    """Module path -> (first op run inside it, depth): a block before its children, h.2 before h.10."""

    def compute() -> dict[str, tuple[int, int]]:
        first: dict[str, tuple[int, int]] = {}
        for op in graph.ops:
            parts = _cut(op.module, depth).split(".") if op.module else []
            for n in range(len(parts) + 1):
                first.setdefault(".".join(parts[:n]), (op.index, n))
        return first

    return graph._memo(f"model_order_{depth}", compute)


def module_rows(graph: Graph, *breakdowns: Breakdown, depth: int | None = None) -> tuple[ModuleRow, ...]:
    """The breakdowns' activations by module side by side, modules whose paths differ only in their layer
    numbers folded into one row (``h.{0-11}.attn``), rows in model order (each group's first module)."""
    order = _model_order(graph, depth)
    per = [dict(b.by_module) for b in breakdowns]
    modules = sorted({m for p in per for m in p}, key=lambda m: (order.get(m, (len(graph.ops), 0)), m))
    rows = [
        ModuleRow(
            label=label or "<root>", modules=len(members), nbytes=tuple(sum(p.get(m, 0) for m in members) for p in per)
        )
        for label, members in fold_names(modules)
    ]
    return tuple(rows)


def _tensor(graph: Graph, sid: int) -> Tensor:
    s = graph.storages[sid]
    names = dict(graph.tensor_names)
    shape, dtype = "", ""
    if s.producer is not None:
        op = graph.ops[s.producer]
        out = next((t for t in op.outputs if t.storage == sid), None)
        if out is not None:
            shape, dtype = "x".join(map(str, out.shape)), out.dtype
        name = f"{op.name.removeprefix('aten.').removesuffix('.default')} in {op.module or '<root>'}"
    else:
        name = names.get(sid, f"storage {sid} (made by {s.kind.value})")
    return Tensor(kind=Kind.of(s.kind), name=name, shape=shape, dtype=dtype, nbytes=s.nbytes)


def as_dict(b: Breakdown) -> dict:
    """A breakdown as JSON: bytes by kind, activations by module, the largest tensors."""
    return {
        "peak_bytes": b.peak_bytes,
        "peak_at": b.peak_at,
        "by_kind": {k.value: n for k, n in b.by_kind},
        "activations_by_module": {m or "<root>": n for m, n in b.by_module},
        "largest": [
            {"kind": t.kind.value, "name": t.name, "shape": t.shape, "dtype": t.dtype, "bytes": t.nbytes}
            for t in b.largest
        ],
    }
