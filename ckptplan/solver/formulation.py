"""The CP-SAT model of the checkpointing choice, built in named phases (cpsat.py searches it):

1. ``Timeline`` (rows.py): positions (one per traced event, one per op rerun of every candidate region
   just before the backward event that triggers its recomputation) and the baseline live bytes at each.
2. ``terms`` (rows.py): every way a decision changes memory, as (bytes, literal expression, [lo, hi)
   positions).
3. ``Formulation``: variables, the gap aggregates (per input shape when there are several), one memory
   constraint per distinct set of active terms, and the objective (estimated recompute time); and the
   value of every row and of the cost under a given plan, without a solver (``evaluate``, ``row_form``).

Memory is scaled to ``unit`` bytes (a power of two chosen so the budget is about 2^22 units) in one
place, ``Formulation.scale``: baseline memory and added bytes round up, saved bytes round down, so a
solution of the scaled model never uses more memory than the model says. The independent simulator
(simulate.py) then checks every solution in exact bytes.
"""

from __future__ import annotations

from typing import Callable

from ortools.sat.python import cp_model

from ..graph import Graph
from .linear import LinearForm
from .regions import Region, nested_pairs
from .remat import SHARED_HOOK
from .rows import Evaluation, Term, TermKind, Timeline, terms as memory_terms


class Formulation:
    """CP-SAT variables and constraints for one step (at one or more input shapes); cpsat.py searches it."""

    def __init__(self, graphs: list[Graph], regions_per_graph: list[tuple[Region, ...]], scale_to: int) -> None:
        """``graphs``: the same step at one or more input shapes; their candidate regions (aligned: same
        paths, same op choices) share one set of decision variables."""
        self.graphs, self.regions = graphs, regions_per_graph[0]
        self.regions_per_graph = regions_per_graph
        regions = self.regions
        self.unit = 1
        while scale_to // self.unit > (1 << 22):
            self.unit <<= 1
        self.m = cp_model.CpModel()
        m = self.m
        # c[j]: 1 iff region j is checkpointed
        self.c = [m.new_bool_var(f"c[{r.path}]") for r in regions]
        # k[j, p]: 1 iff region j is checkpointed and saves op p's outputs (selective checkpointing)
        self.k: dict[tuple[int, int], cp_model.IntVar] = {}
        for j, r in enumerate(regions):
            for p in r.choices:
                self.k[(j, p)] = m.new_bool_var(f"k[{r.path},{p}]")
                # [Constraint] only a checkpointed region caches anything
                m.add_implication(self.k[(j, p)], self.c[j])
        # sel[j]: 1 iff region j runs under selective checkpointing, which it must to cache any op (a
        # region that caches nothing runs as plain checkpoint); only where its dispatch modes cost time
        self.sel: dict[int, cp_model.IntVar] = {}
        for j, r in enumerate(regions):
            if r.choices and any(own[j].selective_ns for own in regions_per_graph):
                self.sel[j] = m.new_bool_var(f"sel[{r.path}]")
                # [Constraint] caching an op needs selective checkpointing, which needs a checkpoint
                for p in r.choices:
                    m.add_implication(self.k[(j, p)], self.sel[j])
                m.add_implication(self.sel[j], self.c[j])
        # (x[j, p] = c[j] - k[j, p] is 1 iff op p is recomputed with region j; never a variable of its own)
        for a, b in nested_pairs(regions):
            # [Constraint] checkpointed regions never nest
            m.add_bool_or([self.c[a].Not(), self.c[b].Not()])
        self.z: dict[tuple[int, int, int], cp_model.IntVar] = {}
        self.row_exprs: list[tuple[int, cp_model.LinearExprT, int]] = []
        # per row: (input shape, regions counted as steady aggregates, other active terms), for bound.py
        self.row_terms: list[tuple[int, tuple[int, ...], tuple[int, ...]]] = []
        self.terms: list[tuple[list[Term], list[list[int]]]] = []  # per input shape: terms, steady terms per region
        self.g: list[list[cp_model.IntVar]] = []  # per input shape: the steady aggregate of each region
        self.prefix: list[list[tuple[cp_model.IntVar, int]]] = []  # per input shape: (s[i], the region it adds)
        for gi, (graph, own) in enumerate(zip(graphs, regions_per_graph)):  # rows for every input shape
            tl = Timeline(graph, own)
            terms = memory_terms(graph, own, tl)
            gap_terms, g = self._build_gap_aggregates(gi, terms)
            self.terms.append((terms, gap_terms))
            self.g.append(g)
            self._build_memory_rows(gi, tl, terms, gap_terms, g)
        top = max((ub for _, _, ub in self.row_exprs), default=0)
        # peak: the step's peak memory in units (an upper bound on every row of every shape)
        self.peak = self.m.new_int_var(0, max(top, 1), "peak")
        self._build_objective()

    # ---- helpers -----------------------------------------------------------------------------------
    def scale(self, nbytes: int) -> int:
        """Bytes to model units, rounded up: baseline memory is never underestimated."""
        return -((-nbytes) // self.unit)

    def expr(self, t: Term) -> cp_model.LinearExpr:
        if t.kind is TermKind.CHECKPOINTED:
            return self.c[t.region]
        if t.kind is TermKind.SAVED:
            return self.k[(t.region, t.op)]
        if t.kind is TermKind.RECOMPUTED:
            return self.c[t.region] - self.k[(t.region, t.op)]
        # z = (op p recomputed) AND (region `other` checkpointed), linearised from below
        key = (t.region, t.op, t.other)
        if key not in self.z:
            z = self.m.new_bool_var(f"z[{t.op},{self.regions[t.other].path}]")
            rec = self.c[t.region] if t.kind is TermKind.HELD_FORCED else self.c[t.region] - self.k[(t.region, t.op)]
            # [Constraint] z >= rec + c[other] - 1: the storage is held by the other region's checkpoint
            self.m.add(z >= rec + self.c[t.other] - 1)
            self.z[key] = z
        return self.z[key]

    def coef(self, t: Term) -> int:
        # [Scaling] added bytes round up, freed bytes round down (conservative either way)
        return -((-t.nbytes) // self.unit) if t.nbytes > 0 else -((-t.nbytes) // self.unit)

    # ---- phases --------------------------------------------------------------------------------------
    def _build_gap_aggregates(self, gi: int, terms: list[Term]) -> tuple[list[list[int]], list[cp_model.IntVar]]:
        gap_terms: list[list[int]] = [[] for _ in self.regions]
        for i, t in enumerate(terms):
            if t.gap:
                gap_terms[t.region].append(i)
        # g[j]: region j's net effect on memory between its forward and its recomputation (units)
        g = []
        for j, idx in enumerate(gap_terms):
            lo = sum(min(0, self.coef(terms[i])) for i in idx)
            hi = sum(max(0, self.coef(terms[i])) for i in idx)
            var = self.m.new_int_var(lo, hi, f"g[{gi},{self.regions[j].path}]")
            # [Constraint] g[j] is the sum of region j's steady terms
            self.m.add(var == sum(self.coef(terms[i]) * self.expr(terms[i]) for i in idx))
            g.append(var)
        return gap_terms, g

    def _build_memory_rows(
        self, gi: int, tl: Timeline, terms: list[Term], gap_terms: list[list[int]], g: list[cp_model.IntVar]
    ) -> None:
        """One row per distinct set of active terms: base (max over its positions) + terms <= peak.

        A region whose steady terms are all active enters a row as its aggregate ``g[j]``. Many regions
        are (every layer before the current one, in forward and in backward), so the rows sum them
        through prefix sums ``s[i] = g[order[0]] + ... + g[order[i-1]]``, ordered by when regions become
        steady: a row's steady set is then one or a few runs of that order, two terms each, and the
        model grows linearly with depth instead of quadratically (Llama-7B shape, 32 layers: 342k terms).
        The equalities add nothing to the LP relaxation: it is the same polytope.
        """
        n = tl.size
        starts: list[list[int]] = [[] for _ in range(n + 1)]
        ends: list[list[int]] = [[] for _ in range(n + 1)]
        for i, t in enumerate(terms):
            starts[t.lo].append(i)
            ends[t.hi].append(i)
        partial: set[int] = set()  # active terms, less those of steady regions (summed as g)
        full: set[int] = set()  # regions whose steady terms are all active
        gap_active = [0] * len(self.regions)
        order: dict[int, int] = {}  # region -> rank by the position it first becomes steady
        rows: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
        key: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())  # nothing active before position 0
        for pos in range(n):
            changed = bool(ends[pos] or starts[pos])
            for i in ends[pos]:
                t = terms[i]
                if t.gap:
                    if t.region in full:  # no longer steady: its other active terms count one by one
                        full.discard(t.region)
                        partial.update(x for x in gap_terms[t.region] if x != i)
                    gap_active[t.region] -= 1
                partial.discard(i)
            for i in starts[pos]:
                t = terms[i]
                partial.add(i)
                if t.gap:
                    gap_active[t.region] += 1
                    if gap_active[t.region] == len(gap_terms[t.region]):
                        full.add(t.region)
                        order.setdefault(t.region, len(order))
                        partial.difference_update(gap_terms[t.region])
            if changed:
                key = (tuple(sorted(full)), tuple(sorted(partial)))
            if rows.get(key, -1) < tl.base[pos]:
                rows[key] = tl.base[pos]
        ranked = sorted(order, key=order.__getitem__)
        steady_hi = [sum(max(0, self.coef(terms[i])) for i in idx) for idx in gap_terms]
        # s[i]: the steady contribution of the first i regions to become steady (units); s[0] = 0
        prefix: list[cp_model.LinearExpr | int] = [0]
        self.prefix.append([])
        lo = hi = 0
        for rank, j in enumerate(ranked):
            lo, hi = lo + g[j].proto.domain[0], hi + g[j].proto.domain[-1]
            var = self.m.new_int_var(lo, hi, f"s[{gi},{rank + 1}]")
            # [Constraint] s[i + 1] = s[i] + g[order[i]]
            self.m.add(var == prefix[-1] + g[j])
            prefix.append(var)
            self.prefix[gi].append((var, j))
        # each term's coefficient, and its coefficient x literal made once at its first row (in the same order
        # as before, so the same variables): a term is in hundreds of rows (HF Mamba: 575k row terms from
        # 2.6k terms; building them one by one was 3.5 s of CPU)
        coefs = [self.coef(t) for t in terms]
        made: dict[int, cp_model.LinearExpr] = {}

        def product(i: int) -> cp_model.LinearExpr:
            if i not in made:
                made[i] = coefs[i] * self.expr(terms[i])
            return made[i]

        # [Constraint] per row: base (max over the row's positions) + steady regions + other active terms <= peak
        for (steady, others), base in sorted(rows.items(), key=lambda kv: kv[0]):
            runs = _runs(sorted(order[j] for j in steady))
            e = sum(prefix[b] - prefix[a] for a, b in runs) + sum(product(i) for i in others)
            ub = self.scale(base) + sum(steady_hi[j] for j in steady) + sum(max(0, coefs[i]) for i in others)
            self.row_exprs.append((self.scale(base), e, ub))
            self.row_terms.append((gi, steady, others))

    def _build_objective(self) -> None:
        # cost: estimated time of every op the recomputations rerun (early stop honoured), of each
        # checkpoint call and of selective checkpointing's dispatch modes, summed over the input shapes
        # (each shape's step is equally likely); flops: the rerun ops' FLOPs
        # (key, ns summed over the input shapes, regions) of each cost regions share (Region.shared)
        self.shared = self._shared_costs()
        self.cost_form = self._rerun_form(lambda op: op.cost_ns, overheads=True)  # also bound.py's objective
        # u[g]: 1 iff some region of shared cost g is checkpointed (a recipe mode, the saved-tensor hook)
        self.u = [self.m.new_bool_var(f"u[{g}]") for g in range(len(self.cost_form.shared))]
        for var, (_, members) in zip(self.u, self.cost_form.shared):
            for j in members:
                # [Constraint] a region on pays the costs it shares (minimising keeps u at 0 otherwise)
                self.m.add_implication(self.c[j], var)
        # the u of the saved-tensor hook, which every rematerialization shares: the search branches on it
        # (``_search_branches``); the LP relaxation alone prices it at its largest fractional c
        hooks = [var for var, (key, _, _) in zip(self.u, self.shared) if key == SHARED_HOOK]
        self.hook = hooks[0] if hooks else None
        self.remat_paths = frozenset(r.path for r in self.regions if r.remat)
        self.cost = self._linear(self.cost_form) + sum(a * var for var, (a, _) in zip(self.u, self.cost_form.shared))
        self.flops = self._linear(self._rerun_form(lambda op: op.flops, overheads=False))

    def _rerun_form(self, value: Callable, *, overheads: bool) -> LinearForm:
        """``value`` summed over every op a checkpointed region reruns: on its region's c, less on its k;
        with ``overheads``, each region's checkpoint cost on its c and its dispatch modes' on its sel."""
        c: dict[int, int] = {}
        k: dict[tuple[int, int], int] = {}
        s: dict[int, int] = {}
        for j, r in enumerate(self.regions):
            if overheads:
                c[j] = sum(own[j].checkpoint_ns for own in self.regions_per_graph)
                if j in self.sel:
                    s[j] = sum(own[j].selective_ns for own in self.regions_per_graph)
            for p in r.recipe if r.remat else range(r.first_op, r.recompute_end):
                v = sum(value(graph.ops[p]) for graph in self.graphs)
                if v:
                    c[j] = c.get(j, 0) + v
                    if (j, p) in self.k:
                        k[(j, p)] = -v
        return LinearForm(
            c={j: a for j, a in c.items() if a},
            k=k,
            z={},
            s=s,
            shared=tuple((a, js) for _, a, js in self.shared) if overheads else (),
        )

    def _shared_costs(self) -> list[tuple[str, int, tuple[int, ...]]]:
        """(key, ns summed over the input shapes, regions carrying it) of each cost regions share, by key."""
        ns: dict[str, int] = {}
        members: dict[str, list[int]] = {}
        for j in range(len(self.regions)):
            for key in dict(self.regions[j].shared):
                ns[key] = max(ns.get(key, 0), sum(dict(own[j].shared).get(key, 0) for own in self.regions_per_graph))
                members.setdefault(key, []).append(j)
        return [(key, ns[key], tuple(members[key])) for key in sorted(ns) if ns[key]]

    def _linear(self, form: LinearForm) -> cp_model.LinearExpr | int:
        parts = (
            [a * self.c[j] for j, a in form.c.items()]
            + [a * self.k[key] for key, a in form.k.items()]
            + [a * self.sel[j] for j, a in form.s.items()]
        )
        return sum(parts) if parts else 0

    # ---- a plan's values, without a solver ----------------------------------------------------------------
    def evaluate(self, saved: dict[int, frozenset[int]]) -> Evaluation:
        """Every row's value (base included, model units) and the cost of checkpointing ``saved``'s regions
        (by index) and caching the ops listed; ``values`` completes the hint CP-SAT is given."""
        values: dict[int, int] = {}  # CP-SAT variable index -> value
        for j, var in enumerate(self.c):
            values[var.index] = int(j in saved)
        for (j, p), var in self.k.items():
            values[var.index] = int(j in saved and p in saved[j])
        for j, var in self.sel.items():
            values[var.index] = int(bool(saved.get(j)))
        for var, (_, members) in zip(self.u, self.cost_form.shared):
            values[var.index] = int(any(j in saved for j in members))
        row_values = [base for base, _, _ in self.row_exprs]
        largest: list[int] = []  # g of the largest input shape
        for gi, (terms, gap_terms) in enumerate(self.terms):
            term_value = [self.coef(t) * _literal(t, saved) for t in terms]
            for t in terms:
                if t.kind in (TermKind.HELD, TermKind.HELD_FORCED):
                    values[self.z[(t.region, t.op, t.other)].index] = _literal(t, saved)
            g = [sum(term_value[i] for i in idx) for idx in gap_terms]
            if gi == 0:
                largest = g
            for j, var in enumerate(self.g[gi]):
                values[var.index] = g[j]
            total = 0
            for var, j in self.prefix[gi]:
                total += g[j]
                values[var.index] = total
            for row, (shape, steady, others) in enumerate(self.row_terms):
                if shape == gi:
                    row_values[row] += sum(g[j] for j in steady) + sum(term_value[i] for i in others)
        cost = self.cost_form.value(saved)
        values[self.peak.index] = max(row_values, default=0)
        return Evaluation(rows=row_values, cost=cost, values=values, steady=largest)

    def row_form(self, index: int) -> LinearForm:
        """Row ``index`` as a linear form over c, k and z (steady aggregates expanded)."""
        gi, steady, others = self.row_terms[index]
        terms, gap_terms = self.terms[gi]
        c: dict[int, int] = {}
        k: dict[tuple[int, int], int] = {}
        z: dict[tuple[int, int, int, bool], int] = {}
        for i in [i for j in steady for i in gap_terms[j]] + list(others):
            t = terms[i]
            a = self.coef(t)
            if t.kind in (TermKind.CHECKPOINTED, TermKind.RECOMPUTED):  # x = c - k
                c[t.region] = c.get(t.region, 0) + a
            if t.kind in (TermKind.SAVED, TermKind.RECOMPUTED):
                key = (t.region, t.op)
                k[key] = k.get(key, 0) + (a if t.kind is TermKind.SAVED else -a)
            if t.kind in (TermKind.HELD, TermKind.HELD_FORCED):
                zkey = (t.region, t.op, t.other, t.kind is TermKind.HELD_FORCED)
                z[zkey] = z.get(zkey, 0) + a
        return LinearForm(c=c, k=k, z=z, constant=self.row_exprs[index][0])


def _literal(t: Term, saved: dict[int, frozenset[int]]) -> int:
    """The value of term ``t``'s literal under ``saved`` (checkpointed region index -> ops it saves)."""
    on = t.region in saved
    if t.kind is TermKind.CHECKPOINTED:
        return int(on)
    if t.kind is TermKind.SAVED:
        return int(on and t.op in saved[t.region])
    recomputed = on and (t.kind is TermKind.HELD_FORCED or t.op not in saved[t.region])
    return int(recomputed and (t.kind is TermKind.RECOMPUTED or t.other in saved))


def _runs(ranks: list[int]) -> list[tuple[int, int]]:
    """Sorted ranks as half-open runs of consecutive ranks: [0, 1, 2, 5] -> [(0, 3), (5, 6)]."""
    out: list[tuple[int, int]] = []
    for r in ranks:
        if out and out[-1][1] == r:
            out[-1] = (out[-1][0], r + 1)
        else:
            out.append((r, r + 1))
    return out


__all__ = ["Formulation"]
