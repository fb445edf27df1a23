"""The policies people use instead of a planner, as decisions over the same candidate regions.

Each returns the same kind of decisions the CP-SAT model returns (checkpointed region -> ops it saves),
so the independent simulator predicts their peak memory and recompute cost exactly as it does ckptplan's:

* ``none``: nothing checkpointed.
* ``full``: every block checkpointed, nothing saved inside (``gradient_checkpointing_enable()``,
  ``apply_activation_checkpointing`` on the blocks).
* ``every_k``: blocks ``0, k, 2k, ...`` checkpointed (torchtitan's selective *layer* option).
* ``op_sac``: every block checkpointed, the outputs of its matmuls and attention kernels saved except
  every second ``mm`` (torchtitan's selective *op* option). torchtitan lists ``aten.mm`` because its
  Llama has no biases; ``addmm`` is the same matmul with a bias, so it is saved too.

A block is a repeated element of a ``ModuleList`` / ``Sequential`` / ``ModuleDict`` (a transformer
layer, a ResNet block). Chen et al.'s sqrt(n) segments checkpoint several consecutive blocks as one unit, which
is not a module call, so it has no prediction here; the policy benchmark measures it on live models.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from ..graph import Graph
from .regions import CONTAINERS, Region
from .simulate import simulate

# Outputs torchtitan's op-level policy saves (its ``_save_list``, with the CPU attention kernel).
SAVED_BY_OP_SAC = frozenset({
    "aten.mm.default", "aten.addmm.default", "aten.bmm.default", "aten.linear.default",
    "aten._scaled_dot_product_flash_attention.default",
    "aten._scaled_dot_product_efficient_attention.default",
    "aten._scaled_dot_product_cudnn_attention.default",
    "aten._scaled_dot_product_flash_attention_for_cpu.default",
})


class Policy(str, Enum):
    NONE = "none"
    FULL = "full"
    EVERY_K = "every_k"
    OP_SAC = "op_sac"


@dataclass(frozen=True, slots=True, kw_only=True)
class BaselineResult:
    policy: Policy
    knob: str  # "k=2" for every_k, "" otherwise
    saved: dict[str, frozenset[int]]  # checkpointed region -> ops it saves (the solver's own form)
    peak_bytes: int  # by the simulator
    extra_forward_flops: int
    extra_cost_ns: int


def blocks(graph: Graph, regions: tuple[Region, ...]) -> tuple[Region, ...]:
    """Candidate regions that are repeated elements of a container (a sibling of the same type), in
    forward order: the layers of a ``ModuleList``, not the embedding beside them in a ``ModuleDict``."""
    types = dict(graph.module_tree)
    siblings: dict[tuple[str, str], int] = {}
    for path, kind in graph.module_tree:
        if "." in path:
            siblings[(path.rsplit(".", 1)[0], kind)] = siblings.get((path.rsplit(".", 1)[0], kind), 0) + 1
    return tuple(r for r in regions if "." in r.path
                 and types.get(r.path.rsplit(".", 1)[0]) in CONTAINERS
                 and siblings.get((r.path.rsplit(".", 1)[0], r.type_name), 0) > 1)


def decisions(graph: Graph, regions: tuple[Region, ...], policy: Policy, k: int = 1) -> dict[str, frozenset[int]]:
    """The regions ``policy`` checkpoints and the ops it saves in each."""
    chosen = blocks(graph, regions)
    if policy is Policy.NONE:
        return {}
    if policy is Policy.FULL:
        return {r.path: frozenset() for r in chosen}
    if policy is Policy.EVERY_K:
        if k < 1:
            raise ValueError(f"every_k needs k >= 1, got {k}")
        return {r.path: frozenset() for i, r in enumerate(chosen) if i % k == 0}
    out = {}
    for r in chosen:
        free = set(r.choices)
        keep, mm = set(), 0
        for p in r.ops:
            name = graph.ops[p].name
            if name == "aten.mm.default":
                mm += 1
                if mm % 2 == 0:
                    continue  # torchtitan recomputes every second mm
            if name in SAVED_BY_OP_SAC and p in free:
                keep.add(p)
        out[r.path] = frozenset(keep)
    return out


def evaluate(graph: Graph, regions: tuple[Region, ...], policy: Policy, k: int = 1) -> BaselineResult:
    saved = decisions(graph, regions, policy, k)
    sim = simulate(graph, regions, saved)
    return BaselineResult(policy=policy, knob=f"k={k}" if policy is Policy.EVERY_K else "", saved=saved,
                          peak_bytes=sim.peak_bytes, extra_forward_flops=sim.extra_forward_flops,
                          extra_cost_ns=sim.extra_cost_ns)


def all_baselines(graph: Graph, regions: tuple[Region, ...]) -> list[BaselineResult]:
    """Every policy at every knob value: every_k for k = 2 .. number of blocks."""
    n = len(blocks(graph, regions))
    out = [evaluate(graph, regions, Policy.NONE)]
    if n:
        out += [evaluate(graph, regions, Policy.FULL), evaluate(graph, regions, Policy.OP_SAC)]
        out += [evaluate(graph, regions, Policy.EVERY_K, k) for k in range(2, n + 1)]
    return out


def best_fitting(results: list[BaselineResult], usable_bytes: int) -> dict[Policy, BaselineResult | None]:
    """Per policy, its cheapest knob (estimated time) whose peak fits, or None when none fits."""
    best: dict[Policy, BaselineResult | None] = {p: None for p in Policy}
    for r in results:
        if r.peak_bytes <= usable_bytes:
            cur = best[r.policy]
            if cur is None or (r.extra_cost_ns, r.extra_forward_flops) < (cur.extra_cost_ns, cur.extra_forward_flops):
                best[r.policy] = r
    return best
