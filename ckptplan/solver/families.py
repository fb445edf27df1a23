"""A memory row's decisions grouped by *family*, for bound.py's knapsack.

A family is an outermost candidate region and every candidate nested in it: a transformer block with its
attention and MLP. Each family's configurations are enumerated here:

* ``checkpoint_sets``: which of its regions are checkpointed (never two nested ones);
* ``variants``: for one set, which regions run under selective checkpointing (paying its dispatch time,
  free to save ops) and which plainly;
* ``build_mode``: one variant's row weight and cost with nothing saved, and its 0/1 knapsack items (each
  saved op, each rematerialization turned off) and groups (linked rematerializations).

bound.py's dynamic programs then solve each family's knapsack and combine the families under the row.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product
from typing import Sequence

from .linear import LinearForm
from .regions import Region

MAX_MODES = 4_096  # a family with more checkpoint sets than this (deep nesting) gives no bound
MAX_SELECTIVE = 4  # a mode with more regions whose dispatch modes cost time drops that cost (2^4 variants)
MAX_GROUP = 6  # rematerializations linked by z terms solved together (every subset: 2^6 options) up to this


@dataclass(frozen=True, slots=True)
class Mode:
    """One configuration of a family (a checkpoint set, each region selective or plain): its row weight
    and cost with nothing saved, and its knapsack items."""

    weight: int  # row units with no knapsack item taken
    cost: int
    items: tuple[tuple[int, int], ...]  # (row units > 0, cost < 0): save this op
    on: frozenset[int] = frozenset()  # the regions this mode checkpoints
    ops: tuple[tuple[int, int], ...] = ()  # (region, op) of each item, in ``items`` order; (j, -1): remat j off
    free: tuple[tuple[int, int], ...] = ()  # (region, op) saved at no cost in row bytes
    remats: tuple[int, ...] = ()  # rematerializations on with no item taken (each item (j, -1) turns j off)
    # rematerializations whose z terms link them (one recipe holds what another drops): one group each,
    # whose options replace the group's base set of rematerializations on; at most one option is taken
    groups: tuple[tuple[tuple[int, int], ...], ...] = ()  # per group: (row units >= 0, cost) of each option
    group_sets: tuple[tuple[frozenset[int], ...], ...] = ()  # per group: the set on with each option
    own: int = 0  # items[:own] save ops; items[own:] turn rematerializations off (shared by many modes)


def families(regions: tuple[Region, ...]) -> list[tuple[int, list[int]]]:
    """(outermost region, every region nested in it), in forward order of the outermost. Nesting is by
    path: a longer recipe (remat.py) nests under its shorter one though its ops may start before it."""
    paths = {r.path: j for j, r in enumerate(regions)}
    members: dict[int, list[int]] = {}
    for j, r in enumerate(regions):
        parts = r.path.split(".")
        root = next((paths[p] for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in paths), j)
        members.setdefault(root, []).append(j)
    return sorted(members.items())


def checkpoint_sets(root: int, members: list[int], regions: tuple[Region, ...]) -> list[frozenset[int]] | None:
    """Every set of the family's regions with no two nested (the empty set included)."""
    parent: dict[int, int | None] = {}
    for j in members:
        above = [i for i in members if i != j and regions[j].path.startswith(regions[i].path + ".")]
        parent[j] = max(above, key=lambda i: len(regions[i].path)) if above else None
    children: dict[int | None, list[int]] = {}
    for j, p in parent.items():
        children.setdefault(p, []).append(j)

    def of(j: int) -> list[frozenset[int]] | None:
        below: list[frozenset[int]] = [frozenset()]
        for child in children.get(j, ()):
            sub = of(child)
            # too many sets: known before forming them (two children of 2,000 sets each were 4M unions, seconds
            # past the time limit on HF Whisper, where nothing checks the deadline)
            if sub is None or len(below) * len(sub) > MAX_MODES:
                return None
            below = [a | b for a, b in product(below, sub)]
        return [frozenset(), frozenset({j})] + [s for s in below if s]

    return of(root)


def variants(
    on: frozenset[int], regions: tuple[Region, ...], cost: LinearForm
) -> list[tuple[frozenset[int], frozenset[int]]]:
    """(regions that may cache ops, regions paying selective checkpointing's time) for each variant of
    checkpointing ``on``: a region whose dispatch modes cost time is selective or plain; the others may
    always cache."""
    free = frozenset(j for j in on if regions[j].choices and not cost.s.get(j))
    charged = sorted(j for j in on if regions[j].choices and cost.s.get(j))
    if len(charged) > MAX_SELECTIVE:
        return [(free | frozenset(charged), frozenset())]  # relaxed: every region may cache, for free
    out = []
    for flags in product((False, True), repeat=len(charged)):
        paid = frozenset(j for j, f in zip(charged, flags) if f)
        out.append((free | paid, paid))
    return out


def build_mode(
    on: frozenset[int],
    may: frozenset[int],
    paid: frozenset[int],
    regions: tuple[Region, ...],
    row: LinearForm,
    z_terms: list[tuple[tuple[int, int, int, bool], int]],
    cost: LinearForm,
    remats: Sequence[int] = (),
    memo: dict | None = None,
) -> Mode:
    """The row weight and cost of checkpointing ``on`` with nothing saved, and the knapsack items: the ops
    of the regions in ``may``; ``paid``: the regions charged selective checkpointing's time.
    ``z_terms``: the row's z terms whose recomputed op belongs to this family.

    ``remats``: the family's rematerializations, items or groups of every mode (``_remat_items``);
    ``memo`` keeps them per checkpoint set, which its variants share."""
    weight = sum(row.c.get(j, 0) for j in on)
    value = sum(cost.c.get(j, 0) for j in on) + sum(cost.s[j] for j in paid)
    item_weight = {(j, p): row.k.get((j, p), 0) for j in may for p in regions[j].choices}
    for (j, p, holder, forced), a in z_terms:
        if a < 0:
            weight += a  # nothing forces z to 0: at 1 it frees the most
        elif j in on and holder in on:  # z >= recomputed(p) + c[holder] - 1 = recomputed(p)
            weight += a
            if not forced and (j, p) in item_weight:
                item_weight[(j, p)] -= a  # saving p clears it
        # else z = 0 is allowed (a region not checkpointed here, or the holder in another family)
    items, free = [], []
    for key, w in item_weight.items():
        c = cost.k.get(key, 0)
        if w <= 0 and c <= 0:
            weight, value = weight + w, value + c  # saving it is free: no bytes, less time
            free.append(key)
        elif c < 0:
            items.append((w, c, key))
    items.sort()
    own = len(items)
    memo = {} if memo is None else memo
    if on not in memo:
        off: list = []
        memo[on] = (_remat_items(on, regions, row, z_terms, cost, remats, off), sorted(off))
    (started, groups, group_sets), off = memo[on]
    items += off
    return Mode(
        weight=weight + sum(w for w, _ in started.values()),
        cost=value + sum(c for _, c in started.values()),
        items=tuple((w, c) for w, c, _ in items),
        on=on,
        ops=tuple(key for _, _, key in items),
        free=tuple(free),
        remats=tuple(sorted(j for j in started if j >= 0)),
        groups=groups,
        group_sets=group_sets,
        own=own,
    )


def _remat_items(
    on: frozenset[int],
    regions: tuple[Region, ...],
    row: LinearForm,
    z_terms: list[tuple[tuple[int, int, int, bool], int]],
    cost: LinearForm,
    remats: Sequence[int],
    items: list,
) -> tuple[dict[int, tuple[int, int]], tuple, tuple]:
    """The rematerializations of a mode: (base weight and cost of each one on at the start, keyed by
    region; -1 - g for group g's base), appending an item that turns off each lone one, and the groups.

    A rematerialization no region of ``on`` contains is eligible; its weight is its row coefficient plus
    its z terms with a holder in ``on`` (exact). Eligible ones linked by z terms (one holds what the
    other drops) or by nesting (a longer recipe and the shorter one: one at most) form groups of at most
    ``MAX_GROUP``, every allowed subset an option with its exact weight; past that size their links are
    dropped (a relaxation: they only add bytes) and their exclusions kept."""
    eligible = [j for j in remats if not any(regions[j].path.startswith(regions[i].path + ".") for i in on)]
    weight = {j: row.c.get(j, 0) for j in eligible}
    links: dict[tuple[int, int], int] = {}
    for (j, _p, holder, _forced), a in z_terms:
        if j in weight and holder in on:
            weight[j] += a
        elif j in weight and holder in weight and a > 0:
            links[(j, holder)] = links.get((j, holder), 0) + a
    nested = {(a, b) for a in eligible for b in eligible if regions[b].path.startswith(regions[a].path + ".")}
    started: dict[int, tuple[int, int]] = {}
    groups: list[tuple[tuple[int, int], ...]] = []
    group_sets: list[tuple[frozenset[int], ...]] = []

    def add(group: list[int], linked: dict[tuple[int, int], int]) -> None:
        if len(group) == 1:  # alone: on when it frees bytes, with an item that turns it off
            j = group[0]
            w, c = weight[j], cost.c.get(j, 0)
            if w < 0:
                started[j] = (w, c)
                if c > 0:
                    items.append((-w, -c, (j, -1)))
            return
        subsets = []
        for mask in range(1 << len(group)):
            chosen = frozenset(j for i, j in enumerate(group) if mask >> i & 1)
            if any(x in chosen and y in chosen for x, y in nested):
                continue  # a longer recipe and the shorter one it nests under: one at most
            w = sum(weight[j] for j in chosen) + sum(a for (x, y), a in linked.items() if x in chosen and y in chosen)
            subsets.append((w, sum(cost.c.get(j, 0) for j in chosen), sorted(chosen), chosen))
        base = min(subsets)
        started[-1 - len(groups)] = (base[0], base[1])
        options = [
            (w - base[0], c - base[1], chosen) for w, c, _, chosen in subsets if chosen != base[3] and c < base[1]
        ]
        group_sets.append((base[3], *(chosen for _, _, chosen in options)))
        groups.append(tuple((w, c) for w, c, _ in options))

    for group in _components(eligible, [*links, *nested]):
        if len(group) <= MAX_GROUP:
            add(group, links)
        else:  # too many to enumerate: their z links dropped (a relaxation), their exclusions kept
            for part in _components(group, [p for p in nested if p[0] in group]):
                add(part, {})
    return started, tuple(groups), tuple(group_sets)


def _components(nodes: list[int], edges: list[tuple[int, int]]) -> list[list[int]]:
    """Connected components of ``nodes`` under ``edges``, each sorted, in order of their first node."""
    parent = {j: j for j in nodes}

    def find(j: int) -> int:
        while parent[j] != j:
            j = parent[j]
        return j

    for a, b in edges:
        parent[find(a)] = find(b)
    out: dict[int, list[int]] = {}
    for j in nodes:
        out.setdefault(find(j), []).append(j)
    return sorted(out.values())


__all__ = ["MAX_GROUP", "MAX_MODES", "MAX_SELECTIVE", "Mode", "build_mode", "checkpoint_sets", "families", "variants"]
