"""``solve(graph, budget)``: candidate regions -> CP-SAT -> simulator check -> Plan.

1. The simulator gives the no-checkpointing and full-checkpointing peaks.
2. A budget at or above the no-checkpointing peak needs no plan: nothing is recomputed.
3. When full checkpointing does not fit, CP-SAT minimises the peak, stopping at the first plan that fits
   the budget; the simulator checks that plan; a budget below the proven minimum, or below the search's
   proven bound, raises ``InfeasibleBudget``. When that search proves nothing (its time limit), the
   simulator checks plans that need no search (every module at one depth) and the search runs again
   without rematerializations; the minimum is the lowest peak checked, reported as an upper bound (NOTE
   [ Minimum without a proof ]). Whichever checked plan peaks lowest is the first solution (hint) of step 4.
4. Recompute time is minimised under the budget, to within ``gap``: solver/primal.py's first plan (the
   knapsack of solver/bound.py, checked on every memory row) when its own bound proves it, otherwise
   CP-SAT's search from that plan (proven by CP-SAT's bound or the knapsack's); the simulator checks
   the answer. Should the two ever disagree, the budget given to CP-SAT is lowered by the overshoot and it
   solves again; a plan is only returned once the simulator says it fits.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Callable, Sequence

from .costmodel import DeviceProfile, load_profile, price
from .decisions import RESERVE_SCALE, make_plan
from .errors import InfeasibleBudget, InputError, SolverTimeout
from .graph import Graph
from .objective import Objective
from .plan import Plan, PlanStatus
from .shapes import Shapes
from .solver.baselines import Policy, decisions
from .solver.regions import Region, outermost
from .solver.simulate import SimResult
from .units import format_bytes, parse_budget, suggest_budget

if TYPE_CHECKING:
    from .solver import cpsat

Progress = Callable[[str, dict], None]

MAX_REPAIRS = 6


# Headroom kept free below the budget when none is given. For one process traced on CPU the simulator
# counts what MemTracker counts, tensor storages, so a reserve would only throw memory away
# (tests/test_zoo.py holds the measured peak to the budget at none). A GPU's caching allocator rounds
# blocks up and fragments, and its kernels take workspaces the trace cannot see; meta and fake tensors are
# planned for a GPU. Under DDP/FSDP the per-rank peak is modelled (parallel.py), not traced. The measured
# margins: docs/benchmarks.md.
CPU_RESERVE = 0.0
DEFAULT_RESERVE = 0.02
# The search is cut on CP-SAT's deterministic clock, this many units per second of the time limit
# (measured: ~0.3 units per wall second on a 2-core CI machine), so a solve stopped by its limit still
# gives a byte-identical plan on every run. The wall-clock limit stays as a hard backstop.
DETERMINISTIC_PER_SECOND = 0.2
# CKPTPLAN_WALL_SLACK=K stretches that backstop to K times the time limit, so that on a machine too busy to
# reach the deterministic limit in time the plan is still the one a quiet machine gives (the test suite
# sets it: a test must not depend on the machine's speed). Unset or below 1: the time limit, as given.
WALL_SLACK_ENV = "CKPTPLAN_WALL_SLACK"


def wall_slack() -> float:
    try:
        return max(1.0, float(os.environ.get(WALL_SLACK_ENV, "1")))
    except ValueError:
        raise InputError(
            f"{WALL_SLACK_ENV}={os.environ[WALL_SLACK_ENV]!r} is not a number; unset it or give a factor such as 10"
        ) from None


# The search stops once the plan is proven within this fraction of the cheapest (estimated recompute
# time), by CP-SAT's bound or by the knapsack bound (solver/bound.py). The cost model's own error is
# larger than that, and proving the last fraction of a percent can still take CP-SAT minutes.
DEFAULT_GAP = 0.005


def _priced(graph: Graph | Sequence[Graph], profile: DeviceProfile | str | os.PathLike) -> list[Graph]:
    if not isinstance(profile, DeviceProfile):
        try:
            profile = load_profile(profile)
        except ValueError as e:
            raise InputError(f"{e}; write one with benchmarks/calibration/gpu_calibrate.py") from None
    graphs = [graph] if isinstance(graph, Graph) else list(graph)
    return [price(g, profile) for g in graphs]


def full_checkpointing(graph: Graph, regions: tuple[Region, ...]) -> dict[str, frozenset[int]]:
    """Each repeated block checkpointed, nothing saved (``baselines.block_paths``: GPT-2's ``h.N``, an encoder's
    ``layers.N``, at any depth); the outermost candidates for a model without blocks."""
    return decisions(graph, regions, Policy.FULL) or {r.path: frozenset() for r in outermost(regions)}


def _levels(regions: tuple[Region, ...]) -> list[tuple[int, dict[str, frozenset[int]]]]:
    """(depth, plan) for each depth of the module tree below the outermost candidates: every checkpoint
    candidate at that depth, or above it where nothing below it is that shallow (never two nested)."""
    plain = [r for r in regions if not r.remat]
    depth = {r.path: r.path.count(".") + 1 for r in plain}
    top = min(depth.values(), default=0)
    out: list[tuple[int, dict[str, frozenset[int]]]] = []
    for d in range(top + 1, max(depth.values(), default=0) + 1):
        level: dict[str, frozenset[int]] = {
            r.path: frozenset()
            for r in plain
            if depth[r.path] <= d and not any(o.path.startswith(r.path + ".") and depth[o.path] <= d for o in plain)
        }
        if level and (not out or level != out[-1][1]):
            out.append((d, level))
    return out


def _floor(model: "cpsat._Model", peak_bound: int) -> int:
    """A lower bound in bytes on every plan's simulated peak: the higher of ``peak_bound`` (a search's bound
    on the model's peak, in units) and what every row reaches with only its freeing terms on (no search:
    a budget of 1 byte is refused on a machine too busy to search). The model rounds each row's base and
    every term up to a unit, so a row's true bytes are at most one unit per term, and one for the base,
    below its value in units."""
    freed = [[min(0, model.coef(t)) for t in terms] for terms, _ in model.terms]  # per shape, per term
    steady_freed = [[sum(f[i] for i in idx) for idx in gap_terms] for f, (_, gap_terms) in zip(freed, model.terms)]
    most = static = 0
    for row, (shape, steady, others) in enumerate(model.row_terms):
        gap_terms, f = model.terms[shape][1], freed[shape]
        most = max(most, len(others) + sum(len(gap_terms[j]) for j in steady))
        static = max(
            static, model.row_exprs[row][0] + sum(steady_freed[shape][j] for j in steady) + sum(f[i] for i in others)
        )
    return max(0, (max(peak_bound, static) - 1 - most) * model.unit)


def default_reserve(graph: Graph) -> float:
    """The reserve ``solve`` keeps when none is given: none for one process on CPU, else 2%."""
    return CPU_RESERVE if graph.device == "cpu" and not graph.parallel else DEFAULT_RESERVE


def check_options(*, reserve: float | None, gap: float) -> None:
    """Refuse a reserve or gap outside its range (the CLI calls this before tracing)."""
    if reserve is not None and not 0 <= reserve < 0.5:
        raise InputError(f"reserve must be a fraction in [0, 0.5), got {reserve}")
    if not 0 <= gap < 1:
        raise InputError(f"gap must be a fraction in [0, 1), got {gap}")


def solve(
    graph: Graph | Sequence[Graph],
    budget: int | str,
    *,
    time_limit_s: float = 30.0,
    reserve: float | None = None,
    workers: int = 1,
    progress: Progress | None = None,
    objective: str = "time",
    gap: float = DEFAULT_GAP,
    rematerialize: bool = True,
    profile: DeviceProfile | str | os.PathLike | None = None,
    server: str | None = None,
) -> Plan:
    """The cheapest plan (estimated recompute time) whose simulated peak fits ``budget``.

    ``objective="flops"`` minimises the recomputed FLOPs instead, then the estimated time among the plans
    with that many FLOPs (FLOPs call memory-bound ops free, so prefer "time" unless FLOPs are what you pay).

    ``graph`` may be a list: the same step traced at several input shapes (sequence lengths). The plan
    then holds for each of them, its peak fits at every shape, and recompute time is summed over them.

    ``reserve`` is headroom kept free below the budget (a fraction of it) for what a trace cannot see
    exactly: a GPU allocator's rounding and fragmentation, kernel workspaces. ``None`` takes the traced
    device's default (``default_reserve``: 0 for one process on CPU, whose peaks the simulator predicts to
    the storage; 2% for a GPU, meta or fake tensors, DDP and FSDP). ``reserve=0`` plans to the byte.

    ``gap`` ends the search once the plan is proven within that fraction of the cheapest (0: optimal).

    ``profile``: the device's costs (a ``costmodel.DeviceProfile`` or a profile file, as
    benchmarks/calibration/gpu_calibrate.py writes one) the recompute time is estimated with; None keeps the graph's
    own (the default profile of its device type).

    ``rematerialize``: besides checkpointing module calls, the plan may drop tensors that backward would
    hold (a BatchNorm + ReLU output the next convolution saves) and rebuild them at their first unpack
    from what backward keeps anyway (solver/remat.py). False plans checkpoints only.

    ``server``: the URL of a ``ckptplan serve`` server, which solves (once for every identical request,
    then from its cache) with these options and one worker; the plan is the one a local solve returns.
    """
    from .solver import cpsat  # OR-Tools: imported to solve, not with the package (NOTE [ Lazy package ])

    check_options(reserve=reserve, gap=gap)
    try:
        goal = Objective(objective)
    except ValueError:
        raise InputError(f"objective must be one of {[o.value for o in Objective]}, not {objective!r}") from None
    if profile is not None:  # priced here: the graph then carries the profile to a server too
        graph = _priced(graph, profile)
    if server is not None:
        from .serve.client import solve_remote

        return solve_remote(
            graph,
            budget,
            server=server,
            time_limit_s=time_limit_s,
            reserve=reserve,
            objective=objective,
            gap=gap,
            rematerialize=rematerialize,
        )
    started = time.monotonic()
    note = progress or (lambda phase, info: None)
    shapes = Shapes(graph, rematerialize=rematerialize)
    graph, regions = shapes.primary, shapes.regions[0]
    reserve = default_reserve(graph) if reserve is None else reserve
    note("simulate", {"regions": len(regions)})
    baseline = shapes.simulate({})
    budget_bytes = parse_budget(budget, reference_bytes=baseline.peak_bytes)
    keep = round((1 - reserve) * RESERVE_SCALE)  # integer arithmetic: usable(minimum) >= peak, always
    usable = budget_bytes * keep // RESERVE_SCALE  # what the simulated peak must fit in
    budget_text = budget if isinstance(budget, str) else str(budget)
    everything: dict[str, frozenset[int]] = {r.path: frozenset() for r in outermost(regions)}
    full = shapes.simulate(everything)
    # what users call full checkpointing, reported in the plan: each repeated block checkpointed, as
    # gradient_checkpointing_enable() and torchtitan do (the outermost candidates where there are no blocks)
    blocks = full_checkpointing(graph, regions)
    full_blocks = shapes.simulate(blocks) if blocks and blocks != everything else full

    def make(
        saved: dict[str, frozenset[int]], sim: SimResult, status: PlanStatus, gap: float, stats: dict[str, int]
    ) -> Plan:
        return make_plan(
            shapes,
            saved,
            sim,
            budget_bytes=budget_bytes,
            budget_text=budget_text,
            reserve=reserve,
            baseline=baseline,
            full=full_blocks,
            status=status,
            gap=gap,
            objective=goal,
            solve_time_s=time.monotonic() - started,
            stats=stats,
        )

    if usable >= baseline.peak_bytes:
        return make({}, baseline, PlanStatus.OPTIMAL, 0.0, {})

    model = cpsat.build(shapes.graphs, shapes.regions, scale_to=usable)
    # the last simulation and the plan record come after the search: keep 2% of the limit for them
    deadline = started + 0.98 * time_limit_s * wall_slack()
    work = DETERMINISTIC_PER_SECOND * time_limit_s  # deterministic seconds for all solves together
    unit = "flops" if goal is Objective.FLOPS else "ns"  # of the objective the progress line shows

    # ---- phase 1: the lowest peak any plan reaches (only needed when full checkpointing does not fit:
    # otherwise the budget is feasible and full checkpointing is the first solution) ----------------------
    # (simulated peak, plan, what found it) of every plan checked; the minimum is the lowest of them
    checked = [(full.peak_bytes, everything, "full checkpointing")]
    proven = False  # the minimum-peak search proved its plan lowest
    remat = any(r.remat for regs in shapes.regions for r in regs)
    floor = 0  # a proven lower bound on every plan's simulated peak (0: none)
    if usable < full.peak_bytes:
        note("minimum peak", {})
        # with rematerializations, half the wall-clock time left at most: the fallback below needs some
        # on a loaded machine (an idle one reaches the deterministic limit first)
        left = (deadline - time.monotonic()) / (2 if remat else 1)
        # the search stops at the first plan that fits: the budget is then feasible, and phase 2 starts
        # from it (the exact minimum only matters to a budget below it)
        low = model.solve(
            budget_bytes=None,
            time_limit_s=max(0.1, left),
            hint=everything,
            workers=workers,
            deterministic_limit=0.3 * work,
            stop_at=usable,
        )
        work -= low.deterministic_s
        if low.status in (cpsat.Status.OPTIMAL, cpsat.Status.FEASIBLE):
            checked.append((shapes.simulate(low.saved).peak_bytes, low.saved, "the minimum-peak search"))
        # proven for the graphs the model holds; the routing variants are only simulated (a lower bound
        # for those graphs is one for the worst routing too)
        proven = low.status is cpsat.Status.OPTIMAL and not shapes.variants
        floor = _floor(model, low.peak_bound)
        fits = min(c[0] for c in checked) <= usable
        # NOTE [ Minimum without a proof ]: the minimum-peak search can end without a plan (HF Mamba: none
        # in 30 s with rematerializations, on a loaded machine none without), and the minimum would fall
        # back to full checkpointing, whose one outermost region (a whole backbone) can peak as high as
        # no checkpointing. The simulator then checks plans that need no search, checkpointing every
        # candidate module at one depth of the module tree, and with rematerializations the search runs
        # again over checkpoints only (a far smaller model), from the lowest of them. The lowest peak
        # checked is an upper bound on the minimum, reported as unproven; the search's bound, when it is
        # above the budget, still proves the budget infeasible.
        if not proven and not fits:
            for depth, level in _levels(regions):
                checked.append(
                    (shapes.simulate(level).peak_bytes, level, f"checkpointing every module at depth {depth}")
                )
        # (not once the wall-clock limit is past: the limit holds, and the floor may still decide)
        if not proven and remat and min(c[0] for c in checked) > usable and time.monotonic() < deadline:
            note("minimum peak", {"rematerialize": False})
            plain = cpsat.build(
                shapes.graphs, [tuple(r for r in regs if not r.remat) for regs in shapes.regions], scale_to=usable
            )
            alt = plain.solve(
                budget_bytes=None,
                time_limit_s=max(0.1, (deadline - time.monotonic()) / 2),
                hint=min(checked, key=lambda c: c[0])[1],
                workers=workers,
                deterministic_limit=0.3 * work,
                stop_at=usable,
            )
            work -= alt.deterministic_s
            if alt.status in (cpsat.Status.OPTIMAL, cpsat.Status.FEASIBLE):
                checked.append(
                    (
                        shapes.simulate(alt.saved).peak_bytes,
                        alt.saved,
                        "the minimum-peak search without rematerialization",
                    )
                )
    min_peak, min_saved, source = min(checked, key=lambda c: c[0])  # the first on a tie
    minimum = -(-min_peak * RESERVE_SCALE // keep)  # the smallest budget whose usable part fits min_peak
    reserve_note = f", plus the {reserve:.0%} reserve" if reserve else ""
    if proven:
        infeasible = InfeasibleBudget(
            f"budget {format_bytes(budget_bytes)} is below the minimum {format_bytes(minimum)} any plan "
            f"reaches for this model and input (parameters, gradients and the largest working set stay"
            f"{reserve_note}); try --budget {suggest_budget(minimum)} or a smaller batch",
            budget_bytes=budget_bytes,
            minimum_bytes=minimum,
        )
    elif floor > usable:
        infeasible = InfeasibleBudget(
            f"budget {format_bytes(budget_bytes)} is below what any plan reaches for this model and input: "
            f"every plan peaks above {format_bytes(floor)}{reserve_note} (proven by the minimum-peak search's "
            f"bound); the lowest peak found needs {format_bytes(minimum)} ({source}), an upper bound on the "
            f"minimum. Try --budget {suggest_budget(minimum)} or a smaller batch",
            budget_bytes=budget_bytes,
            minimum_bytes=minimum,
            minimum_proven=False,
            minimum_source=source,
            minimum_lower_bytes=floor,
        )
    else:
        infeasible = InfeasibleBudget(
            f"no plan fits budget {format_bytes(budget_bytes)} for this model and input; the lowest peak found "
            f"needs {format_bytes(minimum)}{reserve_note} ({source}), an upper bound on the minimum: "
            + (
                f"planned for one routing and checked on {len(shapes.variants)} more, not proven over them. "
                if shapes.variants
                else "the minimum-peak search reached its time limit before proving one lower. "
            )
            + f"Try --budget "
            f"{suggest_budget(minimum)}, a smaller batch, or --time-limit {int(2 * time_limit_s)} for a lower "
            "minimum",
            budget_bytes=budget_bytes,
            minimum_bytes=minimum,
            minimum_proven=False,
            minimum_source=source,
            minimum_lower_bytes=floor,
        )
    if usable < min_peak and (proven or floor > usable):
        raise infeasible

    # ---- phase 2: cheapest plan under the budget, checked by the simulator ------------------------
    best: tuple[dict[str, frozenset[int]], SimResult, cpsat.Solution] | None = None
    target, hint = usable, min_saved
    stats: dict[str, int] = {}
    last = cpsat.Status.UNKNOWN
    for attempt in range(MAX_REPAIRS):
        left = deadline - time.monotonic()
        if left <= 0.2 or work <= 0:
            break
        note("solve", {"attempt": attempt, "budget": target})
        sol = model.solve(
            budget_bytes=target,
            time_limit_s=left,
            hint=hint,
            workers=workers,
            deterministic_limit=work,
            objective=goal,
            gap_limit=gap,
            on_solution=lambda obj, bound: note("improved", {f"objective_{unit}": obj, f"bound_{unit}": bound}),
        )
        work -= sol.deterministic_s
        stats = {
            "variables": sol.num_variables,
            "constraints": sol.num_constraints,
            "repairs": attempt,
            "cp_sat_search": int(sol.searched),
        }  # 0: the knapsack's first plan was proven as it is
        last = sol.status
        if sol.status not in (cpsat.Status.OPTIMAL, cpsat.Status.FEASIBLE):
            break
        sim = shapes.simulate(sol.saved)
        note("checked", {"objective_ns": sol.objective_ns, "gap": sol.gap, "peak": sim.peak_bytes})
        if sim.peak_bytes <= usable:
            best = (sol.saved, sim, sol)
            break
        target -= sim.peak_bytes - usable + model.unit
        hint = min_saved
    if best is None:
        if usable >= min_peak:  # the minimum-peak plan fits; with no proven bound the gap is 100%
            return make(min_saved, shapes.simulate(min_saved), PlanStatus.FEASIBLE, 1.0, stats)
        if last is cpsat.Status.INFEASIBLE:
            raise infeasible
        raise SolverTimeout(
            f"time limit {time_limit_s:g}s reached before any plan fit {format_bytes(budget_bytes)}; "
            f"the lowest peak found is {format_bytes(min_peak)} ({source}; not proven minimal). Try "
            f"--time-limit {int(2 * time_limit_s)} or a budget of at least {format_bytes(minimum)}"
        )
    saved, sim, sol = best
    status = PlanStatus.OPTIMAL if sol.status is cpsat.Status.OPTIMAL else PlanStatus.FEASIBLE
    return make(saved, sim, status, sol.gap, stats)
