"""The policies people use instead of a planner, as decisions over the same candidate regions.

Each returns the same kind of decisions the CP-SAT model returns (checkpointed region -> ops it saves),
so the independent simulator predicts their peak memory and recompute cost exactly as it does ckptplan's:

* ``none``: nothing checkpointed.
* ``full``: every block checkpointed, nothing saved inside (``gradient_checkpointing_enable()``,
  ``apply_activation_checkpointing`` on the blocks).
* ``every_k``: blocks ``0, k, 2k, ...`` checkpointed (torchtitan's selective *layer* option).
* ``op_sac``: every block checkpointed, the outputs of its matmuls and attention kernels saved except
  every second matmul (torchtitan's selective *op* option). torchtitan lists ``aten.mm`` because its
  Llama has no biases; ``addmm`` is the same matmul with a bias, so it is saved and counted too. Its
  dispatch modes run in every block, so each pays them, also a block where it saves nothing (a ResNet's).
* ``sqrt_n``: Chen et al.'s rule as ``torch.utils.checkpoint.checkpoint_sequential`` applies it to the
  chain of blocks: ``ceil(sqrt(n))`` segments of ``n // segments`` consecutive blocks, each but the last
  checkpointed as one unit (``regions.segment``; not a module call, so never one of ckptplan's decisions).

Blocks are what users checkpoint: see ``block_paths`` (shared with the policy benchmark's live anchors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Sequence

from ..graph import CONTAINERS, Graph
from .regions import Region, segment
from .simulate import simulate

# Outputs torchtitan's op-level policy saves (its ``_save_list``, with the CPU attention kernel).
SAVED_BY_OP_SAC = frozenset(
    {
        "aten.mm.default",
        "aten.addmm.default",
        "aten.bmm.default",
        "aten.linear.default",
        "aten._scaled_dot_product_flash_attention.default",
        "aten._scaled_dot_product_efficient_attention.default",
        "aten._scaled_dot_product_cudnn_attention.default",
        "aten._scaled_dot_product_flash_attention_for_cpu.default",
    }
)
# Matmuls for the every-second rule: a Linear with a bias runs addmm, without one mm.
MATMULS = frozenset({"aten.mm.default", "aten.addmm.default", "aten.linear.default"})


class Policy(str, Enum):
    NONE = "none"
    FULL = "full"
    EVERY_K = "every_k"
    OP_SAC = "op_sac"
    SQRT_N = "sqrt_n"


@dataclass(frozen=True, slots=True, kw_only=True)
class BaselineResult:
    policy: Policy
    knob: str  # "k=2" for every_k, "segments=3x2" for sqrt_n (as the policy benchmark writes it), "" otherwise
    saved: dict[str, frozenset[int]]  # checkpointed region -> ops it saves (the solver's own form)
    peak_bytes: int  # by the simulator
    extra_forward_flops: int
    extra_cost_ns: int


def block_paths(module_tree: Sequence[tuple[str, str]]) -> list[str]:
    """The blocks of a module tree ``[(path, type name), ...]``, in registration order.

    Elements of containers that have children of their own (GPT-2's ``transformer.h.*``, not the
    ``wte``/``ln_f`` beside them in its ``ModuleDict``; ResNet's ``layer1.0``, not the stem's conv/BN/ReLU);
    when containers hold single layers only, the containers below the root (a U-Net's ``enc1.net``,
    whose in-place ReLU cannot be checkpointed alone); never a block inside another block.
    """
    types = dict(module_tree)

    def parent(path: str) -> str:
        return path.rsplit(".", 1)[0] if "." in path else ""

    has_children = {parent(path) for path, _ in module_tree if path}
    elements = [
        path for path, kind in module_tree if path and types.get(parent(path)) in CONTAINERS and kind not in CONTAINERS
    ]
    found = [p for p in elements if p in has_children]
    if not found:
        holders = {parent(p) for p in elements} - {""}
        found = [p for p, _ in module_tree if p in holders] or elements
    return [p for p in found if not any(p.startswith(q + ".") for q in found)]


def blocks(graph: Graph, regions: tuple[Region, ...]) -> tuple[Region, ...]:
    """The candidate regions that are blocks (``block_paths``), in forward order."""
    chosen = set(block_paths(graph.module_tree))
    return tuple(r for r in regions if r.path in chosen)


class OpSacRule:
    """torchtitan's op-level rule, one op at a time in forward order (one instance per block call)."""

    def __init__(self) -> None:
        self.matmuls = 0

    def keeps(self, name: str) -> bool:
        """Whether the rule saves this op's output."""
        if name in MATMULS:
            self.matmuls += 1
            if self.matmuls % 2 == 0:
                return False  # every second matmul is recomputed
        return name in SAVED_BY_OP_SAC


def op_sac_keeps(op_names: Sequence[str]) -> list[bool]:
    """torchtitan's op-level rule over one block's ops in forward order: which outputs it saves."""
    rule = OpSacRule()
    return [rule.keeps(name) for name in op_names]


def sqrt_n_segments(graph: Graph, regions: tuple[Region, ...]) -> tuple[tuple[Region, ...], int]:
    """``checkpoint_sequential``'s checkpointed segments and their count (the last one runs plain).

    Empty when the blocks are not one back-to-back chain of at least two candidate regions.
    """
    chain = blocks(graph, regions)
    n = len(chain)
    if n < 2 or n != len(block_paths(graph.module_tree)):
        return (), 0
    count = math.ceil(math.sqrt(n))
    size = n // count
    out = []
    for start in range(0, size * (count - 1), size):
        seg = segment(graph, chain[start : start + size])
        if seg is None:
            return (), 0
        out.append(seg)
    return tuple(out), count


def decisions(graph: Graph, regions: tuple[Region, ...], policy: Policy, k: int = 1) -> dict[str, frozenset[int]]:
    """The regions ``policy`` checkpoints and the ops it saves in each (sqrt_n: its segments' paths)."""
    chosen = blocks(graph, regions)
    if policy is Policy.NONE:
        return {}
    if policy is Policy.SQRT_N:
        return {seg.path: frozenset() for seg in sqrt_n_segments(graph, regions)[0]}
    if policy is Policy.FULL:
        return {r.path: frozenset() for r in chosen}
    if policy is Policy.EVERY_K:
        if k < 1:
            raise ValueError(f"every_k needs k >= 1, got {k}")
        return {r.path: frozenset() for i, r in enumerate(chosen) if i % k == 0}
    out = {}
    for r in chosen:
        free = set(r.choices)
        flags = op_sac_keeps([graph.ops[p].name for p in r.ops])
        out[r.path] = frozenset(p for p, kept in zip(r.ops, flags) if kept and p in free)
    return out


def evaluate(graph: Graph, regions: tuple[Region, ...], policy: Policy, k: int = 1) -> BaselineResult:
    knob = f"k={k}" if policy is Policy.EVERY_K else ""
    if policy is Policy.SQRT_N:
        segments, count = sqrt_n_segments(graph, regions)
        if not segments:
            raise ValueError("sqrt_n needs the blocks to be one back-to-back chain of at least two")
        # what decisions() gives, without a second split
        saved: dict[str, frozenset[int]] = {seg.path: frozenset() for seg in segments}
        regions = regions + segments
        knob = f"segments={count}x{len(segments[0].members)}"
    else:
        saved = decisions(graph, regions, policy, k)
    sim = simulate(graph, regions, saved)
    cost = sim.extra_cost_ns
    if policy is Policy.OP_SAC:  # its dispatch modes run in every block, also where they cache nothing
        by_path = {r.path: r for r in regions}
        cost += sum(by_path[path].selective_ns for path, ops in saved.items() if not ops)
    return BaselineResult(
        policy=policy,
        knob=knob,
        saved=saved,
        peak_bytes=sim.peak_bytes,
        extra_forward_flops=sim.extra_forward_flops,
        extra_cost_ns=cost,
    )


def all_baselines(graph: Graph, regions: tuple[Region, ...]) -> list[BaselineResult]:
    """Every policy at every knob value: every_k for k = 2 .. number of blocks; sqrt_n where the blocks
    form a chain."""
    n = len(blocks(graph, regions))
    out = [evaluate(graph, regions, Policy.NONE)]
    if n:
        out += [evaluate(graph, regions, Policy.FULL), evaluate(graph, regions, Policy.OP_SAC)]
        out += [evaluate(graph, regions, Policy.EVERY_K, k) for k in range(2, n + 1)]
    if sqrt_n_segments(graph, regions)[0]:
        out.append(evaluate(graph, regions, Policy.SQRT_N))
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
