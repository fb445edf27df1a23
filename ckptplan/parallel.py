"""Per-rank memory under data parallelism, as a transformation of a traced graph.

The budget is per rank. Trace the step one rank runs (its share of the batch), then ``for_ranks`` turns
the single-process graph into what each rank holds; the solver and the simulator need no change.

* ``ddp``: every rank holds full parameters and gradients, plus DDP's gradient buckets, which keep a
  second copy of the gradients (none with ``gradient_as_bucket_view=True``: pass ``bucket_view=True``).
* ``fsdp`` (FSDP2, ``fully_shard`` on each unit and on the root): each rank keeps 1/N of every
  parameter and gradient. One unit's parameters are all-gathered at a time, and during its backward its
  unsharded gradients exist until they are reduce-scattered: the fixed memory is the sharded parameters
  and gradients plus the largest unit, all-gathered, and its unsharded gradients.

Units default to the elements of the model's containers (transformer blocks, ResNet blocks) with the
root owning every other parameter, which is how FSDP2 is usually applied.
"""

from __future__ import annotations

from dataclasses import replace
from enum import Enum
from typing import Sequence

from .errors import InputError
from .graph import CONTAINERS, Graph, StorageKind


class Parallel(str, Enum):
    DDP = "ddp"
    FSDP = "fsdp"


def default_units(graph: Graph) -> list[str]:
    """Elements of ModuleList / Sequential / ModuleDict containers: FSDP2's usual per-block units."""
    types = dict(graph.module_tree)
    units = []
    for path, kind in graph.module_tree:
        parent = path.rsplit(".", 1)[0] if "." in path else ("" if path else None)
        if parent is not None and types.get(parent) in CONTAINERS and kind not in CONTAINERS:
            units.append(path)
    return units


def for_ranks(
    graph: Graph,
    *,
    world_size: int,
    mode: str | Parallel,
    units: Sequence[str] | None = None,
    bucket_view: bool = False,
) -> Graph:
    """What one of ``world_size`` ranks holds when ``graph``'s step runs under DDP or FSDP2."""
    mode = Parallel(mode) if isinstance(mode, str) else mode
    if world_size < 1:
        raise InputError(f"world size must be at least 1, got {world_size}")
    if graph.parallel:
        raise InputError(f"this graph is already per rank ({graph.parallel})")
    params = [s for s in graph.storages if s.kind is StorageKind.PARAM]
    grads = [s for s in graph.storages if s.kind is StorageKind.GRAD]
    if mode is Parallel.DDP:
        buckets = 0 if bucket_view else sum(s.nbytes for s in grads)
        return replace(
            graph, extra_fixed_bytes=graph.extra_fixed_bytes + buckets, parallel=f"ddp:{world_size}", _cache={}
        )
    names = dict(graph.tensor_names)
    units = sorted(default_units(graph) if units is None else units, key=len, reverse=True)

    def unit_of(sid: int) -> str:
        name = names.get(sid, "")
        return next((u for u in units if name.startswith(u + ".")), "")  # "" is the root unit

    unit_params: dict[str, int] = {}
    for s in params:
        unit_params[unit_of(s.id)] = unit_params.get(unit_of(s.id), 0) + s.nbytes
    root = unit_params.pop("", 0)
    largest = max(unit_params.values(), default=0)
    shard = {s.id: -(-s.nbytes // world_size) for s in params + grads}  # dim 0 padded to N: round up
    storages = tuple(replace(s, nbytes=shard[s.id]) if s.id in shard else s for s in graph.storages)
    # The root's parameters stay all-gathered from forward to backward (FSDP2 does not reshard the root
    # after forward). Beside them, in a unit's backward: its parameters all-gathered, its unsharded
    # gradients before the reduce-scatter, and the next unit's parameters, prefetched.
    gathered = root + 3 * largest
    return replace(
        graph,
        storages=storages,
        extra_fixed_bytes=graph.extra_fixed_bytes + gathered,
        optimizer_state_bytes=-(-graph.optimizer_state_bytes // world_size),
        parallel=f"fsdp:{world_size}",
        _cache={},
    )
