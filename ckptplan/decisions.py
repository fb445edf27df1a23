"""Plans and decisions: the plan record a solve's decisions make (``make_plan``), and a plan file's
decisions on a freshly traced step (``plan_decisions``, ``check_plan``), as the simulator takes them."""

from __future__ import annotations

from ._version import __version__
from .errors import InputError, PlanMismatch
from .graph import Forced, Graph, parse_path
from .objective import Objective
from .plan import Decision, OpDecision, Plan, PlanStatus, RegionPlan
from .shapes import Shapes, candidates
from .solver.regions import Region
from .solver.simulate import SimResult, simulate
from .units import format_bytes

RESERVE_SCALE = 10**6  # the reserve is applied in millionths


def make_plan(
    shapes: Shapes,
    saved: dict[str, frozenset[int]],
    sim: SimResult,
    *,
    budget_bytes: int,
    budget_text: str,
    reserve: float,
    baseline: SimResult,
    full: SimResult,
    status: PlanStatus,
    gap: float,
    objective: Objective,
    solve_time_s: float,
    stats: dict[str, int],
) -> Plan:
    graph, regions = shapes.primary, shapes.regions[0]
    out = []
    for r in regions:
        if r.path not in saved:
            continue
        keep, forced = saved[r.path] | frozenset(r.kept), dict(r.forced)
        ops = []
        for i in r.ops:
            op = graph.ops[i]
            reruns = i < r.recompute_end and i not in keep
            base = parse_path(r.path)[0] if r.remat else r.path
            rel = (
                op.module[len(base) + 1 :]
                if base and op.module.startswith(base + ".")
                else (op.module if not base else "")
            )
            reason = forced.get(i)
            ops.append(
                OpDecision(
                    op=op.name,
                    module=rel,
                    shape=tuple(t.shape for t in op.outputs) or ((),),
                    dtype=op.outputs[0].dtype if op.outputs else "none",
                    nbytes=sum(graph.storages[s].nbytes for s in op.allocates),
                    decision=Decision.SAVE if i in keep else Decision.RECOMPUTE,
                    recompute_flops=op.flops if reruns else 0,
                    recompute_ns=op.cost_ns if reruns else 0,
                    forced=reason if isinstance(reason, Forced) else None,
                )
            )
        prefix = r.path + "."
        target = _target(graph, r) if r.remat else None
        out.append(
            RegionPlan(
                path=r.path,
                type_name=r.type_name,
                ops=tuple(ops),
                target=target,
                mutated_buffers=tuple(b[len(prefix) :] if b.startswith(prefix) else b for b in r.mutated_buffers),
            )
        )
    traced: dict[tuple[str, ...], str] = {}  # input shapes -> fingerprint (routings of one shape share it)
    for g in shapes.graphs + shapes.variants:
        traced.setdefault(g.inputs, g.fingerprint)
    return Plan(
        model=graph.model_name,
        fingerprint=graph.fingerprint,
        signature=graph.signature,
        num_parameters=graph.num_parameters,
        inputs=graph.inputs,
        shapes=tuple(traced),
        fingerprints=tuple(traced.values()),
        device=graph.device,
        gpu=graph.gpu,
        eval_modules=graph.eval_modules,
        autocast=graph.autocast,
        optimizer=graph.optimizer,
        parallel=graph.parallel,
        budget_bytes=budget_bytes,
        budget_text=budget_text,
        reserve=reserve,
        baseline_peak_bytes=baseline.peak_bytes,
        full_peak_bytes=full.peak_bytes,
        predicted_peak_bytes=sim.peak_bytes,
        forward_flops=graph.forward_flops,
        extra_forward_flops=sim.extra_forward_flops,
        extra_cost_ns=sim.extra_cost_ns,
        status=status,
        gap=round(gap, 6),
        objective=objective,
        solve_time_s=solve_time_s,
        regions=tuple(out),
        ckptplan_version=__version__,
        torch_version=graph.torch_version,
        solver_stats=stats,
    )


def check_plan(graph: Graph, plan: Plan) -> SimResult:
    """Re-simulate ``plan``'s decisions on ``graph``; refuse a plan for another model or one that no
    longer fits its budget (a hand edit), saying what differs or by how much it overshoots."""
    if graph.fingerprint not in plan.fingerprints:
        raise PlanMismatch(
            f"the plan was traced from another model or input (fingerprint {plan.fingerprint}, "
            f"this step {graph.fingerprint}): {_first_difference(graph, plan)}"
        )
    regions, saved = plan_decisions(graph, plan)
    sim = simulate(graph, regions, saved)
    usable = plan.budget_bytes * round((1 - plan.reserve) * RESERVE_SCALE) // RESERVE_SCALE
    if sim.peak_bytes > usable:
        raise InputError(
            f"the plan's decisions no longer fit its budget: simulated peak {format_bytes(sim.peak_bytes)} "
            f"exceeds {format_bytes(usable)} ({plan.budget_text} less the {plan.reserve:.0%} reserve) by "
            f"{format_bytes(sim.peak_bytes - usable)} ({sim.peak_at}); was it edited by hand? "
            "Regenerate it with `ckptplan solve`"
        )
    return sim


def plan_decisions(graph: Graph, plan: Plan) -> tuple[tuple[Region, ...], dict[str, frozenset[int]]]:
    """Every candidate of ``graph`` and ``plan``'s decisions on them as the simulator takes them (region
    path -> the graph's op indices it saves); InputError for a decision that is not a candidate's."""
    regions = candidates(graph)
    by_path = {r.path: r for r in regions}
    saved: dict[str, frozenset[int]] = {}
    for rp in plan.regions:
        region = by_path.get(rp.path)
        # from a data-dependent op on, the number of ops is the routing's (graph.py's NOTE [ Data-dependent
        # spans ]): the ops before it must agree
        varies = next((i for i, o in enumerate(rp.ops) if o.forced is Forced.DATA_DEPENDENT), None)
        own = (
            None
            if region is None
            else next((p - region.first_op for p, why in region.forced if why is Forced.DATA_DEPENDENT), None)
        )
        if (
            region is None
            or (len(rp.ops) != len(region.ops) if varies is None and own is None else varies != own)
            or rp.remat != region.remat
        ):
            what = "rematerialization" if rp.remat else "checkpointable region"
            raise InputError(
                f"the plan names {rp.path}, which is not a {what} of this step (or has another "
                "number of ops); regenerate it with `ckptplan solve`"
            )
        if rp.remat and rp.target != _target(graph, region):
            assert rp.target is not None  # rp.remat: it names a target
            raise InputError(
                f"the plan's {rp.path} rebuilds output {list(rp.target)} of its recipe, but this step's "
                f"candidate rebuilds {list(_target(graph, region))}; regenerate it with `ckptplan solve`"
            )
        forced = dict(region.forced)
        keep = set()
        for i, o in enumerate(rp.ops):
            reason = Forced.DATA_DEPENDENT if varies is not None and i >= varies else forced.get(region.first_op + i)
            if reason is Forced.KEPT:  # the recipe reads its outputs: never rerun (nor a decision to save)
                if o.decision is not Decision.SAVE:
                    raise InputError(
                        f"{rp.path} op #{i} {o.op} is kept: the recipe reads its outputs, which "
                        "backward keeps anyway, instead of rerunning it; set it back to save"
                    )
            elif o.decision is Decision.SAVE:
                if reason is not None:
                    raise InputError(
                        f"{rp.path} op #{i} {o.op} cannot be saved ({reason.value}); set it back to recompute"
                    )
                keep.add(region.first_op + i)
        saved[rp.path] = frozenset(keep)
    return regions, saved


def _target(graph: Graph, region: Region) -> tuple[int, int]:
    """(recipe op, tensor output) a rematerialization rebuilds, as the plan file names it."""
    made_by = graph.storages[region.target].producer
    assert made_by is not None  # a recipe's target is made by a forward op (remat.py)
    producer = graph.ops[made_by]
    return producer.index - region.first_op, next(
        k for k, t in enumerate(producer.outputs) if t.storage == region.target
    )


def _first_difference(graph: Graph, plan: Plan) -> str:
    if tuple(plan.inputs) != graph.inputs:
        return f"inputs {list(plan.inputs)} vs {list(graph.inputs)}"
    if plan.signature != graph.signature:
        return f"parameters differ ({plan.num_parameters:,} vs {graph.num_parameters:,} parameters)"
    return "the op sequence differs (another torch version, device type or code path)"
