"""``fit``: the largest value of one input size (a batch size, a sequence length) whose step fits a budget.

    def build(n):
        model, args = make_model(batch_size=n, device="meta")
        return ckptplan.trace(model, *args)

    result = fit(build, "80GB", argument="batch_size")
    result.best.value, result.best.plan   # the largest batch size that fits, and its cheapest plan

Peak memory grows with the value, so the search doubles it from ``start`` until no plan fits (or ``limit``
is reached), then bisects between the largest value that fits and the smallest that does not. Each value is
traced by the caller's ``build`` (a model built on the meta device or with fake tensors needs no memory, so
the search runs on a laptop) and solved with the planner's deterministic limits: the same inputs try the same
values and return the same plan. For each value the minimum-peak search gives the lowest budget any plan
fits (the table's "minimum budget"); a value fits when the planner returns a plan under the budget, the
cheapest it finds (estimated recompute time, or FLOPs with ``objective="flops"``).

Known limitations: the search assumes that a value that does not fit has no larger value that fits
(peaks that shrink as the value grows, say from padding to a multiple, can make it stop early); it never
tries a value above ``limit``. Like ``solve``, each search keeps a wall-clock backstop (its time limit) beside
the deterministic limit; on a heavily loaded machine it can cut a search first, and the plan then differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .auto import STEP_PER_FORWARD
from .errors import InfeasibleBudget, InputError, SolverTimeout
from .graph import Graph
from .plan import Plan
from .planner import DEFAULT_GAP, solve
from .units import format_bytes, parse_budget, suggest_budget

DEFAULT_LIMIT = 2**20  # the largest value tried unless the caller gives one: a search doubles 20 times at most
BELOW_ANY_PLAN = 1  # a budget of one byte: solve() then runs its minimum-peak search and reports the minimum


@dataclass(frozen=True, slots=True, kw_only=True)
class Trial:
    """One value tried: its unplanned peak, the lowest budget known to fit it and the plan, if one fits."""

    value: int
    no_checkpointing_peak_bytes: int
    minimum_bytes: int | None  # lowest budget a plan is known to fit; None: the search found no plan in its limit
    minimum_proven: bool  # the solver proved no plan fits a lower budget
    forward_cost_ns: int  # estimated time of the forward pass, what the recompute cost is a fraction of
    plan: Plan | None  # the cheapest plan under the budget; None when none fits

    def __post_init__(self) -> None:
        if self.value < 1:
            raise ValueError(f"Trial.value must be positive, got {self.value}")
        if self.minimum_bytes is not None and self.minimum_bytes < 1:
            raise ValueError(f"Trial.minimum_bytes must be positive or None, got {self.minimum_bytes}")

    @property
    def fits(self) -> bool:
        return self.plan is not None

    @property
    def step_time_fraction(self) -> float | None:
        """The plan's estimated recompute time as a fraction of the step's (forward and backward)."""
        if self.plan is None:
            return None
        step = STEP_PER_FORWARD * self.forward_cost_ns
        return self.plan.extra_cost_ns / step if step else 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class FitResult:
    """The largest value that fits (``best``) and every value tried, in the order tried."""

    argument: str
    budget_bytes: int
    trials: tuple[Trial, ...]
    best: Trial
    limit: int  # the largest value the search may try

    def __post_init__(self) -> None:
        if self.best.plan is None:
            raise ValueError("FitResult.best must be a trial that fits")

    @property
    def at_limit(self) -> bool:
        """The largest value allowed fits: larger ones may fit too but were not tried."""
        return self.best.value >= self.limit

    def by_value(self) -> tuple[Trial, ...]:
        return tuple(sorted(self.trials, key=lambda t: t.value))


def fit(
    build: Callable[[int], Graph],
    budget: int | str,
    *,
    argument: str = "batch_size",
    start: int = 1,
    limit: int = DEFAULT_LIMIT,
    multiple_of: int = 1,
    time_limit_s: float = 30.0,
    reserve: float | None = None,
    objective: str = "time",
    gap: float = DEFAULT_GAP,
    rematerialize: bool = True,
    progress: Callable[[Trial], None] | None = None,
) -> FitResult:
    """The largest value of ``argument`` (a multiple of ``multiple_of`` in ``[start, limit]``) whose step,
    as ``build(value)`` traces it, has a plan under ``budget``, with that plan.

    ``budget`` is absolute ("80GB", bytes): a percentage would be of a peak that changes with the value.
    ``time_limit_s``, ``reserve``, ``objective``, ``gap`` and ``rematerialize`` are ``solve``'s, for each
    value. ``progress`` is called with each trial as it ends.

    Raises ``InfeasibleBudget`` (exit 3) when not even ``start`` fits, with the lowest budget that fits it,
    and ``SolverTimeout`` (exit 4) when the time limit found no plan at ``start``.
    """
    if isinstance(budget, str) and budget.strip().endswith("%"):
        raise InputError(
            f"budget {budget!r} is a percentage of the unplanned peak, which changes with "
            f"{argument}: give an absolute size such as 80GB or 7.5GiB"
        )
    budget_bytes = parse_budget(budget)
    for name, value in (("start", start), ("limit", limit), ("multiple_of", multiple_of)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive whole number, got {value!r}")
    start = -(-start // multiple_of) * multiple_of  # the first multiple at or above start
    limit = limit // multiple_of * multiple_of
    if start > limit:
        raise InputError(f"no multiple of {multiple_of} lies between start {start} and limit {limit}")
    note = progress or (lambda trial: None)
    tried: dict[int, Trial] = {}

    def run(value: int) -> Trial:
        trial = _try(
            build(value),
            value,
            budget_bytes,
            time_limit_s=time_limit_s,
            reserve=reserve,
            objective=objective,
            gap=gap,
            rematerialize=rematerialize,
        )
        tried[value] = trial
        note(trial)
        return trial

    first = run(start)
    if not first.fits:
        raise _nothing_fits(first, argument, budget_bytes, time_limit_s)
    # exponential phase: double until a value does not fit or the limit is reached
    fits, fails = start, None
    while fits < limit:
        value = min(2 * fits, limit)
        if run(value).fits:
            fits = value
        else:
            fails = value
            break
    # binary phase: the largest value that fits lies in [fits, fails)
    if fails is not None:
        while fails - fits > multiple_of:
            value = (fits + fails) // 2 // multiple_of * multiple_of
            if run(value).fits:
                fits = value
            else:
                fails = value
    return FitResult(
        argument=argument, budget_bytes=budget_bytes, trials=tuple(tried.values()), best=tried[fits], limit=limit
    )


def _try(
    graph: Graph,
    value: int,
    budget_bytes: int,
    *,
    time_limit_s: float,
    reserve: float | None,
    objective: str,
    gap: float,
    rematerialize: bool,
) -> Trial:
    """Solve one value: the minimum-peak search, then (unless it proved the budget too low) the plan."""
    options = dict(
        time_limit_s=time_limit_s, reserve=reserve, objective=objective, gap=gap, rematerialize=rematerialize
    )
    minimum: int | None = None
    proven = False
    try:
        solve(graph, BELOW_ANY_PLAN, **options)  # type: ignore[arg-type]  # options: dict[str, object]
    except InfeasibleBudget as e:
        minimum, proven = e.minimum_bytes, e.minimum_proven
    except SolverTimeout:
        pass  # no plan found in the limit: the solve under the budget below decides
    plan = None
    if not (proven and minimum is not None and minimum > budget_bytes):
        try:
            plan = solve(graph, budget_bytes, **options)  # type: ignore[arg-type]  # options: dict[str, object]
        except (InfeasibleBudget, SolverTimeout):
            plan = None
    if plan is not None and (minimum is None or minimum > budget_bytes):  # the budget itself is known to fit
        minimum, proven = budget_bytes, False
    return Trial(
        value=value,
        no_checkpointing_peak_bytes=graph.baseline_peak_bytes,
        minimum_bytes=minimum,
        minimum_proven=proven,
        forward_cost_ns=graph.forward_cost_ns,
        plan=plan,
    )


def _nothing_fits(trial: Trial, argument: str, budget_bytes: int, time_limit_s: float) -> Exception:
    if trial.minimum_bytes is None:
        return SolverTimeout(
            f"nothing fits budget {format_bytes(budget_bytes)}: at {argument}={trial.value} the solver found no "
            f"plan in its time limit of {time_limit_s:g} s; try --time-limit {int(2 * time_limit_s)} or a "
            "larger budget"
        )
    what = "the minimum" if trial.minimum_proven else "the lowest budget known to fit (not proven minimal)"
    return InfeasibleBudget(
        f"nothing fits budget {format_bytes(budget_bytes)}: even at {argument}={trial.value}, {what} is "
        f"{format_bytes(trial.minimum_bytes)}; try --budget {suggest_budget(trial.minimum_bytes)} or a smaller "
        "model",
        budget_bytes=budget_bytes,
        minimum_bytes=trial.minimum_bytes,
        minimum_proven=trial.minimum_proven,
    )
