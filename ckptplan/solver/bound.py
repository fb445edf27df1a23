"""A lower bound on recompute cost that CP-SAT does not find by itself: one memory row, solved exactly.

On deep models a single memory row binds (measured with the LP relaxation: every other nonzero dual is
on a definition), and the LP relaxation of that row is a fractional knapsack. The integer optimum can be
1-5% above it (GPT-2-XL shape, 12 layers: 4.6%). CP-SAT's search cannot close that gap: layers that look
the same to the row can be swapped, so it would have to try every swap, and it stays at the LP bound for
minutes, even on this one row alone.

Here the row is solved exactly as a knapsack over *families*. A family is an outermost candidate region
and every candidate nested in it: a transformer block with its attention and MLP. Two choices make up a
family's configuration (enumerated in families.py):

* its *mode*: which of its regions are checkpointed (never two nested ones);
* which ops of those regions are saved: a 0/1 knapsack item each, costing row bytes and saving recompute
  time. A region may save ops only under selective checkpointing, whose dispatch modes cost a fixed
  time (``LinearForm.s``): each mode comes in variants, each region of it selective (paying that time,
  its ops items) or plain (no items).

For each family, a dynamic program over the row's bytes gives the least cost at every weight. Identical
layers give identical tables, so the layers are folded and their swaps cost nothing. A second dynamic
program then combines the families under the row's capacity. What makes it a relaxation (so the result
is a valid lower bound on the full model):

* every other memory row is dropped;
* a "z" term (a storage that one region's checkpoint holds as its input while another region recomputes
  it) links two families; it is dropped when its two regions are in different families, since a term
  that adds bytes can only make the row harder;
* past ``families.MAX_SELECTIVE`` charged regions in one mode, the variants are replaced by one that may cache in
  every region and pays no dispatch time (a cheaper, so still valid, relaxation);
* bytes are rounded down: each saved op to 1/``FINE`` of its family's range, each family to
  1/``BUCKETS`` of the row's free range. That costs less than one saved activation, but a tight row can
  need the finer ``FINE_BUCKETS`` (Llama-7B shape, 32 layers, 98% of the halfway budget: 0.94% gap at
  40,000, proven optimal at 160,000; 0.4 s a row).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import numpy as np

from .families import Mode, build_mode, checkpoint_sets, families, variants
from .linear import LinearForm
from .regions import Region

BUCKETS = 40_000  # resolution of the row's free range (rounding down: a valid bound, slightly weaker)
FINE_BUCKETS = 160_000  # the same, for a second look at the best row when the first does not prove the gap
FINE = 1 << 16  # resolution of one family's own range, for the knapsack over its saved ops
# what each region of a shared cost branched off costs more (ns): above any plan's cost, and exact in the
# tables' float64 even summed over a few hundred regions
OFF = 1 << 44

clock = time.monotonic  # what a deadline is read against (a test gives a fake one)


class _OutOfTime(Exception):
    """The deadline passed while a row was being solved: it gives no result."""


def _check(deadline: float) -> None:
    """Stop the row once ``deadline`` (``clock()``) has passed. One row of a wide model takes seconds in its
    family tables and backtrack (HF CLIP: 43 s of a 30 s limit), so the clock is read inside them, between
    steps of a fraction of a millisecond each."""
    if deadline != math.inf and clock() >= deadline:
        raise _OutOfTime


@dataclass(frozen=True, slots=True)
class RowSolution:
    """The least cost under one row, and (when asked) decisions reaching it on the rounded row."""

    bound: int  # a valid lower bound on the cost of the full model
    saved: dict[int, frozenset[int]] | None  # checkpointed region -> ops it saves
    work: int  # table cells computed: a deterministic measure of the time it took


def lower_bound(
    regions: tuple[Region, ...],
    row: LinearForm,
    capacity: int,
    cost: LinearForm,
    *,
    buckets: int = BUCKETS,
    deadline: float = math.inf,
) -> int | None:
    """The least ``cost`` of any decisions whose ``row`` stays within ``capacity``, with the row's free range
    in ``buckets`` steps (more: tighter and slower); None when a family has too many modes, no decision
    fits (then the caller has a better source of truth) or ``deadline`` passed first."""
    found = solve_row(regions, row, capacity, cost, buckets=buckets, deadline=deadline)
    return None if found is None else found.bound


def solve_row(
    regions: tuple[Region, ...],
    row: LinearForm,
    capacity: int,
    cost: LinearForm,
    *,
    buckets: int = BUCKETS,
    plan: bool = False,
    deadline: float = math.inf,
) -> RowSolution | None:
    """``lower_bound``, and with ``plan`` the decisions of one cheapest configuration of the rounded row.

    Those decisions are a first plan, not a proven one: bytes rounded down, other rows and cross-family
    z terms ignored, they may overshoot this row by a little and other rows by more (primal.py checks
    and repairs them).

    Costs shared by several regions (``LinearForm.shared``) are charged spread over them
    (``LinearForm.spread``), but for the one with the most regions (the saved-tensor hook every
    rematerialization shares), spread too thin to count: it is branched on. Once with its regions off
    (each priced ``OFF`` more: no plan with one is cheaper than a plan without), once with its cost paid
    whatever the plan. Every plan is in one branch at its true cost or more, so the lesser bound holds;
    the plan is the lesser branch's.

    ``deadline`` (``clock()``'s time): past it the row stops where it is and gives None. Before it the
    result does not depend on the clock."""
    try:
        return _solve_shared(regions, row, capacity, cost, buckets=buckets, plan=plan, deadline=deadline)
    except _OutOfTime:
        return None


def _solve_shared(
    regions: tuple[Region, ...],
    row: LinearForm,
    capacity: int,
    cost: LinearForm,
    *,
    buckets: int,
    plan: bool,
    deadline: float,
) -> RowSolution | None:
    """``solve_row`` (which catches the deadline)."""
    group = max(((a, members) for a, members in cost.shared if len(members) > 1), key=lambda g: len(g[1]), default=None)
    if group is None:
        return _solve_row(regions, row, capacity, cost.spread(), buckets=buckets, plan=plan, deadline=deadline)
    rest = tuple(g for g in cost.shared if g != group)
    a, members = group
    off = replace(cost, c={**cost.c, **{j: cost.c.get(j, 0) + OFF for j in members}}, shared=rest)
    paid = replace(cost, constant=cost.constant + a, shared=rest)
    found = [
        _solve_row(regions, row, capacity, form.spread(), buckets=buckets, plan=plan, deadline=deadline)
        for form in (off, paid)
    ]
    solved = [f for f in found if f is not None]
    if len(solved) < len(found):
        return None
    best = min(solved, key=lambda f: f.bound)
    return replace(best, work=sum(f.work for f in solved))


def _solve_row(
    regions: tuple[Region, ...],
    row: LinearForm,
    capacity: int,
    cost: LinearForm,
    *,
    buckets: int,
    plan: bool,
    deadline: float = math.inf,
) -> RowSolution | None:
    """``solve_row`` for a cost without shared terms; raises ``_OutOfTime`` past ``deadline``."""
    grouped = families(regions)
    family_of = {j: root for root, members in grouped for j in members}
    z_of: dict[int, list[tuple[tuple[int, int, int, bool], int]]] = {}  # family -> its z terms
    for key, a in row.z.items():
        z_of.setdefault(family_of[key[0]], []).append((key, a))
    tables: list[tuple[int, list[Mode]]] = []
    for root, members in grouped:
        _check(deadline)
        # rematerializations are knapsack items (or groups) of each mode around them, never a mode
        leaves = [j for j in members if regions[j].remat]
        plain = [j for j in members if j not in leaves]
        sets = [frozenset()] if root in leaves else checkpoint_sets(root, plain, regions)
        if sets is None:
            return None
        memo: dict = {}  # the rematerialization items of each checkpoint set, shared by its variants
        modes = [
            build_mode(on, may, paid, regions, row, z_of.get(root, []), cost, leaves, memo)
            for on in sets
            for may, paid in variants(on, regions, cost)
        ]
        tables.append((min(m.weight for m in modes), modes))
    low = sum(w for w, _ in tables) + row.constant
    span = capacity - low
    if span < 0:
        return None
    step = max(1, span // buckets)
    n = span // step + 1
    # run[b]: least cost of the families so far with rounded weight <= b buckets above their minimum
    run = np.full(n, float(cost.constant))
    runs = [run]  # after each family, for the backtrack
    seen: dict[tuple, np.ndarray] = {}  # identical families (layers) share one table
    keys = []
    work = 0
    for w_min, modes in tables:
        family = (w_min, tuple((m.weight, m.cost, m.items, m.groups) for m in modes))
        if family not in seen:
            seen[family] = _family_table(w_min, modes, step, n, deadline)
            work += _fine(w_min, modes)[1] * sum(len(m.items) + sum(map(len, m.groups)) + 1 for m in modes)
        keys.append(family)
        run, steps = _combine(run, seen[family], deadline)
        work += steps * n
        if plan:
            runs.append(run)
    if not np.isfinite(run[-1]):
        return None
    saved: dict[int, frozenset[int]] | None = None
    if plan:
        saved = {}
        b = n - 1
        configs: dict[tuple, tuple[int, tuple[int, ...], tuple[int, ...]]] = {}  # -> mode, items, options
        for f in range(len(tables) - 1, -1, -1):
            table, before = seen[keys[f]], runs[f]
            width = min(len(table), b + 1)
            # the bucket this family took in the cheapest configuration
            beta = int(np.argmin(before[b - np.arange(width)] + table[:width]))
            b -= beta
            if (keys[f], beta) not in configs:  # identical families: the same mode and items, by position
                configs[(keys[f], beta)] = _family_config(*tables[f], step, beta, deadline)
            index, taken, options = configs[(keys[f], beta)]
            mode = tables[f][1][index]
            ops = [*mode.free, *(mode.ops[i] for i in taken)]
            saved.update({j: frozenset(p for r, p in ops if r == j) for j in mode.on})
            off = {r for r, p in ops if p < 0}
            saved.update({j: frozenset() for j in mode.remats if j not in off})
            for group_sets, o in zip(mode.group_sets, options):
                saved.update({j: frozenset() for j in group_sets[o]})
    return RowSolution(bound=int(np.floor(run[-1])), saved=saved, work=work)


def _family_table(w_min: int, modes: list[Mode], step: int, n: int, deadline: float = math.inf) -> np.ndarray:
    """table[b]: least cost of the family with weight below ``(b + 1) * step`` above ``w_min``.

    The knapsack inside the family runs at a finer resolution (``FINE`` buckets over the family's own
    range), so rounding each item down costs little; the result is then read at the row's buckets.
    """
    fine, size, top = _fine(w_min, modes)
    best = np.full(size, np.inf)
    shared: dict[tuple, np.ndarray] = {}
    for m in modes:
        _check(deadline)
        np.minimum(best, _knapsack_last(m, w_min, fine, size, shared), out=best)
    best = np.minimum.accumulate(best)
    return best[_row_ends(fine, size, step, min(n, top // step + 1))]


def _fine(w_min: int, modes: list[Mode]) -> tuple[int, int, int]:
    """The family's own resolution: bytes per fine bucket, the number of fine buckets, and the family's
    range (its heaviest configuration above ``w_min``)."""
    top = max(
        m.weight - w_min + sum(w for w, _ in m.items) + sum(max((w for w, _ in g), default=0) for g in m.groups)
        for m in modes
    )
    fine = max(1, top // FINE)
    return fine, top // fine + 1, top


def _row_ends(fine: int, size: int, step: int, count: int) -> np.ndarray:
    """The last fine bucket read for each of the first ``count`` row buckets: a configuration counted in
    fine bucket f weighs at least f * fine, so it belongs to row bucket f * fine // step."""
    return np.minimum(((np.arange(count) + 1) * step - 1) // fine, size - 1)


def _knapsack(m: Mode, w_min: int, fine: int, size: int) -> list[np.ndarray]:
    """The 0/1 knapsack over one mode's items (weights rounded down to whole fine buckets): the table
    before any item and after each one (least cost at exactly each fine weight)."""
    table = np.full(size, np.inf)
    table[(m.weight - w_min) // fine] = m.cost
    out = [table]
    for w, c in m.items:
        table = _take(table, w // fine, c, size)
        out.append(table)
    for options in m.groups:  # at most one option of each group
        new = table.copy()
        for w, c in options:
            b = w // fine
            np.minimum(new[b:], table[: size - b] + c, out=new[b:])
        table = new
        out.append(table)
    return out


def _knapsack_last(m: Mode, w_min: int, fine: int, size: int, shared: dict[tuple, np.ndarray]) -> np.ndarray:
    """``_knapsack``'s last table. The rematerialization items and groups are the same in most of a
    family's modes: their knapsack, from weight and cost 0, is computed once (``shared``), then shifted to
    the mode's own weight and cost and given its op items (the knapsack does not depend on item order)."""
    key = (m.items[m.own :], m.groups)
    if key not in shared:
        shared[key] = _knapsack(Mode(weight=w_min, cost=0, items=key[0], groups=m.groups), w_min, fine, size)[-1]
    start = (m.weight - w_min) // fine
    table = np.full(size, np.inf)
    table[start:] = shared[key][: size - start] + m.cost
    for w, c in m.items[: m.own]:
        table = _take(table, w // fine, c, size)
    return table


def _take(table: np.ndarray, b: int, c: int, size: int) -> np.ndarray:
    """One 0/1 item of ``b`` fine buckets and cost ``c`` added to a knapsack table."""
    return table + c if b == 0 else np.concatenate((table[:b], np.minimum(table[b:], table[: size - b] + c)))


def _family_config(
    w_min: int, modes: list[Mode], step: int, beta: int, deadline: float = math.inf
) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """The mode (its index), the items (their indices) and each group's set (index into ``group_sets``,
    0 for its base) of the cheapest configuration counted in row bucket ``beta`` of ``_family_table``."""
    fine, size, _ = _fine(w_min, modes)
    end = int(_row_ends(fine, size, step, beta + 1)[-1])
    # the cheapest mode from each mode's last table alone (``_knapsack_last``, its shared part once, as
    # ``_family_table`` finds it), then every table of that mode only, for the walk back: keeping every
    # table of every mode was 55 of 80 s of HF BERT's first plan, past any time limit
    best: tuple[float, int] | None = None
    shared: dict[tuple, np.ndarray] = {}
    for index, m in enumerate(modes):
        _check(deadline)
        last = _knapsack_last(m, w_min, fine, size, shared)
        cheapest = float(np.min(last[: end + 1]))
        if best is None or cheapest < best[0]:
            best = (cheapest, index)
    assert best is not None
    index = best[1]
    tables = _knapsack(modes[index], w_min, fine, size)
    f = int(np.argmin(tables[-1][: end + 1]))
    mode = modes[index]
    chosen = []
    for g in range(len(mode.groups), 0, -1):  # the groups were added last: walk them back first
        after, before = tables[len(mode.items) + g], tables[len(mode.items) + g - 1]
        pick = 0
        if after[f] < before[f]:
            pick = next(
                o + 1
                for o, (w, c) in enumerate(mode.groups[g - 1])
                if f >= w // fine and before[f - w // fine] + c == after[f]
            )
            f -= mode.groups[g - 1][pick - 1][0] // fine
        chosen.append(pick)
    taken = []
    for i in range(len(modes[index].items), 0, -1):  # walk the items back: taken where the table moved
        b = modes[index].items[i - 1][0] // fine
        if b == 0 or tables[i][f] < tables[i - 1][f]:
            taken.append(i - 1)
            f -= b
    return index, tuple(sorted(taken)), tuple(reversed(chosen))


def _combine(run: np.ndarray, table: np.ndarray, deadline: float = math.inf) -> tuple[np.ndarray, int]:
    """Min-plus convolution of two non-increasing arrays: only the table's steps need trying (returned
    with their number). The clock is read every 256 steps."""
    out = np.full(len(run), np.inf)
    finite = np.isfinite(table)
    if not finite.any():
        return out, 0
    steps = np.flatnonzero(np.concatenate(([True], table[1:] != table[:-1])) & finite)
    for i, b in enumerate(steps):
        if i % 256 == 0:
            _check(deadline)
        np.minimum(out[b:], run[: len(run) - b] + table[b], out=out[b:])
    return out, len(steps)
