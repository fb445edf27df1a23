"""The Plan record and its YAML file, written for human review.

The file starts with what a reviewer reads first (fingerprint, budget, peaks, extra FLOPs, solver
status), then one block per group of identical checkpointed regions ("layers folded") or
rematerializations (a tensor rebuilt at its first unpack by the ops listed as recompute; those listed as
save are kept: the recipe reads their outputs), one line per op:
``[op, module, shape, dtype, bytes, decision, recompute FLOPs, recompute ns, forced-by]``. Writing is deterministic
(same plan, byte-identical file) and atomic (a temporary file renamed into place).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from .errors import InputError
from .graph import Forced
from .names import expand_paths, fold_paths
from .objective import Objective
from .safeyaml import MAX_FLOW_DEPTH, NoAliasLoader, flow_depth
from .units import format_bytes, format_flops

SCHEMA_VERSION = 1


class PlanStatus(str, Enum):
    """What the solver proved of a plan. Formats as its value, as the plain string it replaces did."""

    OPTIMAL = "optimal"  # proven the cheapest plan the model holds (gap 0)
    FEASIBLE = "feasible"  # fits the budget; ``Plan.gap`` bounds how much cheaper another plan can be

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Decision(str, Enum):
    SAVE = "save"  # outputs kept for backward (cached by selective checkpointing)
    RECOMPUTE = "recompute"  # rerun in backward


def _objective(value: object) -> Objective:
    try:
        return Objective(value)
    except (ValueError, TypeError):
        raise InputError(f"plan objective must be 'time' or 'flops', not {value!r}") from None


def _status(value: object) -> PlanStatus:
    try:
        return PlanStatus(value)
    except (ValueError, TypeError):
        raise InputError(f"plan status must be 'optimal' or 'feasible', not {value!r}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class OpDecision:
    op: str  # "aten.addmm.default"
    module: str  # path relative to the region ("" for the region itself)
    shape: tuple[tuple[int, ...], ...]  # output shapes
    dtype: str
    nbytes: int  # bytes the op allocates
    decision: Decision
    recompute_flops: int  # FLOPs paid when it is rerun (0 when saved or past the early stop)
    recompute_ns: int  # estimated time paid when it is rerun (costmodel.py), 0 likewise
    forced: Forced | None = None  # why its decision is fixed (random, view, inplace, ...)


@dataclass(frozen=True, slots=True, kw_only=True)
class RegionPlan:
    path: str  # module path of the checkpointed call
    type_name: str
    ops: tuple[OpDecision, ...]  # every op of the call, in order
    mutated_buffers: tuple[str, ...] = ()  # relative names, restored after recomputation
    # a rematerialization (type "rematerialize"): (op row, tensor output) of the tensor its recipe rebuilds
    target: tuple[int, int] | None = None

    @property
    def remat(self) -> bool:
        return self.target is not None

    @property
    def extra_forward_flops(self) -> int:
        return sum(o.recompute_flops for o in self.ops)

    def pattern(self) -> str:
        """Equal for identical layers: same ops, shapes and decisions."""
        return json.dumps(
            [
                self.type_name,
                list(self.mutated_buffers),
                self.target and list(self.target),
                [_op_row(o) for o in self.ops],
            ]
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    model: str
    fingerprint: str  # Graph.fingerprint of the traced step
    signature: str  # parameters, buffers and module types of the model (checked by apply)
    num_parameters: int
    inputs: tuple[str, ...]  # the largest shape, whose op rows the file shows
    device: str
    optimizer: str | None
    parallel: str  # "" for one process, "ddp:N" or "fsdp:N": the budget is per rank
    budget_bytes: int
    budget_text: str
    reserve: float  # fraction of the budget kept free as headroom
    baseline_peak_bytes: int  # no checkpointing
    full_peak_bytes: int  # each repeated block checkpointed, nothing saved (planner.full_checkpointing)
    predicted_peak_bytes: int  # this plan, by the simulator
    forward_flops: int
    extra_forward_flops: int
    extra_cost_ns: int  # estimated recompute time
    status: PlanStatus
    gap: float  # proven relative gap of the objective
    objective: Objective = Objective.TIME  # what the solver minimised
    solve_time_s: float = field(default=0.0, compare=False)  # not in the file: identical solves, identical files
    regions: tuple[RegionPlan, ...]
    ckptplan_version: str = ""
    torch_version: str = ""
    schema: int = SCHEMA_VERSION
    solver_stats: dict[str, int] = field(default_factory=dict, compare=False)
    shapes: tuple[tuple[str, ...], ...] = ()  # every input spec the plan holds for (``inputs`` first)
    fingerprints: tuple[str, ...] = ()  # Graph.fingerprint of each shape, in the same order
    gpu: str = ""  # the GPU a cuda plan was made for ("h100", "sm86"); "" for a cpu plan
    eval_modules: tuple[str, ...] = ()  # modules the traced step ran in eval mode (frozen BatchNorm, ...)
    autocast: str = ""  # torch.autocast's dtype the step runs under ("bfloat16", "float16"); "" for none

    def __post_init__(self) -> None:
        if not self.shapes:
            object.__setattr__(self, "shapes", (tuple(self.inputs),))
        if not self.fingerprints:
            object.__setattr__(self, "fingerprints", (self.fingerprint,))
        if not re.fullmatch(r"((ddp|fsdp):[1-9][0-9]{0,6})?", self.parallel):
            raise InputError(
                f'plan field parallel must be "" (one process), "ddp:N" or "fsdp:N" with N ranks, not {self.parallel!r}'
            )
        # a plan built with strings holds the enums all the same
        object.__setattr__(self, "objective", _objective(self.objective))
        object.__setattr__(self, "status", _status(self.status))
        for name in ("budget_bytes", "baseline_peak_bytes", "full_peak_bytes", "predicted_peak_bytes"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise InputError(f"plan field {name} must be a non-negative integer number of bytes")

    @property
    def extra_forward_fraction(self) -> float:
        return self.extra_forward_flops / self.forward_flops if self.forward_flops else 0.0

    def region(self, path: str) -> RegionPlan | None:
        return next((r for r in self.regions if r.path == path), None)

    def with_regions(self, regions: tuple[RegionPlan, ...]) -> "Plan":
        return replace(self, regions=regions)

    # ---- YAML -------------------------------------------------------------------------------------
    def to_yaml(self) -> str:
        return dump_yaml(self)

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically: a reader never sees half a file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would surprise anyone sharing plans
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self.to_yaml())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


# ---- writing --------------------------------------------------------------------------------------
def _remove_stale_temporaries(path: Path) -> None:
    """Delete the temporary files that writers of ``path`` on this machine left when they were killed
    (SIGKILL, power loss). A temporary is ``.NAME.PID.XXXXXXXX.tmp``; one whose process still runs is another
    writer's, in flight, and is left alone."""
    for tmp in path.parent.glob(f".{glob_escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2 :].split(".", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except (PermissionError, OverflowError):  # another user's process, or no such pid at all
            continue


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def _op_row(o: OpDecision) -> list[Any]:
    shape = [list(s) for s in o.shape]
    return [
        o.op,
        o.module,
        shape[0] if len(shape) == 1 else shape,
        o.dtype,
        o.nbytes,
        o.decision.value,
        o.recompute_flops,
        o.recompute_ns,
        o.forced.value if o.forced is not None else None,
    ]


def fold_regions(regions: tuple[RegionPlan, ...]) -> list[tuple[list[str], RegionPlan]]:
    """Group identical regions, keeping forward order of each group's first member."""
    groups: dict[str, tuple[list[str], RegionPlan]] = {}
    for r in regions:
        groups.setdefault(r.pattern(), ([], r))[0].append(r.path)
    return list(groups.values())


def _q(v: Any) -> str:
    return json.dumps(v)  # JSON scalars and flow lists are valid YAML


def dump_yaml(plan: Plan) -> str:
    pct = 100 * plan.extra_forward_fraction
    lines = [
        f"# ckptplan plan for {plan.model}: peak {format_bytes(plan.predicted_peak_bytes)} "
        f"(budget {format_bytes(plan.budget_bytes)}), +{pct:.1f}% forward FLOPs",
        f"schema: {plan.schema}",
        f"ckptplan: {_q(plan.ckptplan_version)}",
        f"torch: {_q(plan.torch_version)}",
        f"model: {_q(plan.model)}",
        f"fingerprint: {_q(plan.fingerprint)}",
        f"signature: {_q(plan.signature)}",
        f"parameters: {plan.num_parameters}",
        f"inputs: {_q(list(plan.inputs))}",
        f"shapes: {_q([list(x) for x in plan.shapes])}  # every input the plan holds for",
        f"fingerprints: {_q(list(plan.fingerprints))}",
        f"device: {_q(plan.device)}",
        *([f"gpu: {_q(plan.gpu)}  # its kernels and allocator are the ones planned for"] if plan.gpu else []),
        *(
            [f"eval_modules: {_q(list(plan.eval_modules))}  # in eval mode in the traced step"]
            if plan.eval_modules
            else []
        ),
        *(
            [f"autocast: {_q(plan.autocast)}  # forward and loss run under torch.autocast with this dtype"]
            if plan.autocast
            else []
        ),
        f"optimizer: {_q(plan.optimizer)}",
        f"parallel: {_q(plan.parallel)}  # the budget is per rank",
        "budget:",
        f"  bytes: {plan.budget_bytes}",
        f"  given: {_q(plan.budget_text)}",
        f"  display: {_q(format_bytes(plan.budget_bytes))}",
        f"  reserve: {plan.reserve}  # kept free for what the trace cannot see",
        "peak:  # bytes; predicted by the simulator",
        f"  no_checkpointing: {plan.baseline_peak_bytes}  # {format_bytes(plan.baseline_peak_bytes)}",
        f"  full_checkpointing: {plan.full_peak_bytes}  # {format_bytes(plan.full_peak_bytes)}",
        f"  plan: {plan.predicted_peak_bytes}  # {format_bytes(plan.predicted_peak_bytes)}",
        "flops:  # torch.utils.flop_counter counts, 2 per FMA",
        f"  forward: {plan.forward_flops}  # {format_flops(plan.forward_flops)}",
        f"  extra_forward: {plan.extra_forward_flops}  # {format_flops(plan.extra_forward_flops)}",
        f"  extra_forward_percent: {round(pct, 3)}",
        f"  estimated_recompute_ns: {plan.extra_cost_ns}  # {plan.extra_cost_ns / 1e6:.3f} ms: reruns, checkpoint "
        "calls, dispatch modes",
        "solver:",
        f"  objective: {plan.objective.value}  # minimised: estimated recompute time, or FLOPs then time",
        f"  status: {plan.status.value}",
        f"  gap: {round(plan.gap, 6)}",
    ]
    for k in sorted(plan.solver_stats):
        lines.append(f"  {k}: {plan.solver_stats[k]}")
    lines.append("# one block per group of identical checkpointed regions (or rematerializations); op rows are")
    lines.append("# [op, module, shape, dtype, bytes, decision, recompute_flops, recompute_ns, forced_by]")
    lines.append(f"checkpointed_regions: {len(plan.regions)}")
    lines.append("regions:" if plan.regions else "regions: []")
    order = {r.path: i for i, r in enumerate(plan.regions)}
    for paths, r in fold_regions(plan.regions):
        saved = sum(1 for o in r.ops if o.decision is Decision.SAVE)
        lines.append(f"  - modules: {_q(fold_paths(paths))}")
        lines.append(f"    type: {_q(r.type_name)}")
        lines.append(f"    count: {len(paths)}")
        lines.append(f"    at: {_q([order[p] for p in paths])}  # positions in forward order")
        lines.append(f"    num_ops: {len(r.ops)}")
        kept = ", reading the outputs of the saved ones" if saved else ""
        how = (
            f"rematerialized: the tensor is rebuilt from its recipe at its first unpack{kept}"
            if r.remat
            else "selective checkpointing"
            if saved
            else "plain checkpoint"
        )
        lines.append(
            f"    extra_forward_flops_each: {r.extra_forward_flops}"
            f"  # {format_flops(r.extra_forward_flops)}; {saved} of {len(r.ops)} ops saved ({how})"
        )
        lines.append(f"    restores_buffers: {_q(list(r.mutated_buffers))}")
        if r.remat:
            assert r.target is not None  # a rematerialization names its target (RegionPlan)
            lines.append(f"    target: {_q(list(r.target))}  # [op row, tensor output] the recipe rebuilds")
        lines.append("    ops:")
        for o in r.ops:
            lines.append(f"      - {_q(_op_row(o))}")
    return "\n".join(lines) + "\n"


# ---- reading --------------------------------------------------------------------------------------
def load_plan(path: str | os.PathLike) -> Plan:
    """Read a plan file. Every problem raises InputError naming the file and what to do.

    Besides its syntax, the plan's own consistency is checked (plan_from_dict): a hand edit that saves an
    op the plan marks as unsaveable (random, view, in-place, ...) is refused here, before ``apply``.
    """
    path = Path(path)
    try:
        if path.exists() and not path.is_file():  # a FIFO or a device would block or never end
            raise InputError(
                f"plan file {path} is not a regular file; give the path of a plan written by `ckptplan solve`"
            )
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"plan file {path} does not exist; create one with `ckptplan solve -o {path}`") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read plan file {path}: {e}") from None
    if flow_depth(text) > MAX_FLOW_DEPTH:
        raise InputError(
            f"plan file {path} nests brackets more than {MAX_FLOW_DEPTH} deep; it is not a ckptplan "
            "plan: regenerate it with `ckptplan solve`"
        )
    try:
        data = yaml.load(text, Loader=NoAliasLoader)  # a SafeLoader subclass
    except yaml.YAMLError as e:
        raise InputError(
            f"plan file {path} is not valid YAML ({str(e).splitlines()[0]}); regenerate it with `ckptplan solve`"
        ) from None
    except (ValueError, RecursionError) as e:  # an integer over Python's digit limit; nesting too deep
        raise InputError(
            f"plan file {path} is not a ckptplan plan ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else 'too deeply nested'}); "
            "regenerate it with `ckptplan solve`"
        ) from None
    return plan_from_dict(data, source=str(path))


def plan_from_dict(data: Any, *, source: str = "plan") -> Plan:
    if not isinstance(data, dict):
        raise InputError(f"{source} is not a ckptplan plan (expected a mapping at the top level)")
    if data.get("schema") != SCHEMA_VERSION:
        raise InputError(
            f"{source} has schema {data.get('schema')!r}; this ckptplan reads schema "
            f"{SCHEMA_VERSION}: regenerate the plan with `ckptplan solve`"
        )
    try:
        placed: list[tuple[int, RegionPlan]] = []
        for block in data["regions"] or []:
            ops = tuple(_op_from_row(row) for row in block["ops"])
            paths = expand_paths(block["modules"])
            if len(paths) != block["count"] or len(block["at"]) != len(paths) or len(ops) != block["num_ops"]:
                raise InputError(
                    f"{source}: region block {block['modules']!r} has {len(paths)} modules and "
                    f"{len(ops)} op rows but says count {block['count']} and num_ops "
                    f"{block['num_ops']}: the file is truncated or was edited inconsistently"
                )
            for at, p in zip(block["at"], paths):
                target = block.get("target")
                if target is not None and (len(target) != 2 or not 0 <= int(target[0]) < len(ops)):
                    raise InputError(
                        f"{source}: block {block['modules']!r} has target {target!r}, which is not "
                        "[op row, tensor output] of its rows: the file was edited inconsistently"
                    )
                where = None if target is None else (int(target[0]), int(target[1]))
                placed.append(
                    (
                        int(at),
                        RegionPlan(
                            path=p,
                            type_name=block["type"],
                            ops=ops,
                            mutated_buffers=tuple(block.get("restores_buffers") or ()),
                            target=where,
                        ),
                    )
                )
        regions = tuple(r for _, r in sorted(placed, key=lambda x: x[0]))
        for r in regions:
            check_decisions(r)
        if len(regions) != data["checkpointed_regions"] or sorted(a for a, _ in placed) != list(range(len(placed))):
            raise InputError(
                f"{source}: it lists {len(regions)} checkpointed regions but says "
                f"{data['checkpointed_regions']}: the file is truncated or was edited inconsistently"
            )
        flops = data["flops"]
        if sum(r.extra_forward_flops for r in regions) != int(flops["extra_forward"]):
            raise InputError(
                f"{source}: its op rows add up to {sum(r.extra_forward_flops for r in regions)} extra "
                f"FLOPs but the header says {flops['extra_forward']}: the file was edited inconsistently"
            )
        solver = data["solver"]
        stats = {k: int(v) for k, v in solver.items() if k not in ("objective", "status", "gap")}
        return Plan(
            model=str(data["model"]),
            fingerprint=str(data["fingerprint"]),
            signature=str(data["signature"]),
            num_parameters=int(data["parameters"]),
            inputs=tuple(data["inputs"]),
            device=str(data["device"]),
            optimizer=data["optimizer"],
            parallel=str(data["parallel"]),
            shapes=tuple(tuple(x) for x in data["shapes"]),
            fingerprints=tuple(data["fingerprints"]),
            budget_bytes=data["budget"]["bytes"],
            budget_text=str(data["budget"]["given"]),
            reserve=float(data["budget"]["reserve"]),
            baseline_peak_bytes=data["peak"]["no_checkpointing"],
            full_peak_bytes=data["peak"]["full_checkpointing"],
            predicted_peak_bytes=data["peak"]["plan"],
            forward_flops=int(flops["forward"]),
            extra_forward_flops=int(flops["extra_forward"]),
            extra_cost_ns=int(flops["estimated_recompute_ns"]),
            status=_status(str(solver["status"])),
            gap=float(solver["gap"]),
            objective=_objective(str(solver.get("objective", "time"))),
            regions=regions,
            ckptplan_version=str(data.get("ckptplan", "")),
            torch_version=str(data.get("torch", "")),
            solver_stats=stats,
            gpu=str(data.get("gpu", "") or ""),
            eval_modules=tuple(str(m) for m in data.get("eval_modules", ()) or ()),
            autocast=_autocast_field(data.get("autocast", "") or ""),
        )
    except InputError as e:
        msg = str(e)
        raise InputError(msg if msg.startswith(source) else f"{source}: {msg}") from None
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise InputError(
            f"{source} is malformed ({type(e).__name__}: {e}); regenerate it with `ckptplan solve`"
        ) from None


def _op_from_row(row: Any) -> OpDecision:
    op, module, shape, dtype, nbytes, decision, flops, ns, forced = row
    shapes = shape if shape and isinstance(shape[0], list) else [shape]
    if forced is not None and forced not in {f.value for f in Forced}:
        raise InputError(
            f"op {op}: forced-by {forced!r} is not one of "
            f"{', '.join(f.value for f in Forced)} or null; regenerate the plan with `ckptplan solve`"
        )
    return OpDecision(
        op=str(op),
        module=str(module),
        shape=tuple(tuple(int(d) for d in s) for s in shapes),
        dtype=str(dtype),
        nbytes=int(nbytes),
        decision=Decision(decision),
        recompute_flops=int(flops),
        recompute_ns=int(ns),
        forced=None if forced is None else Forced(forced),
    )


def check_decisions(region: RegionPlan) -> None:
    """InputError for an op row whose decision its own row contradicts (a hand edit): an op forced to be
    recomputed (random, view, in-place, ...) marked save, or a rematerialization's kept op marked
    recompute. Other edits (saving a free op) are allowed; ``verify`` and ``show --model`` check them
    against a fresh trace (decisions.check_plan), whose peak may no longer fit."""
    for i, o in enumerate(region.ops):
        where = f"{region.path} op #{i} {o.op}"
        if o.forced is Forced.KEPT and o.decision is not Decision.SAVE:
            raise InputError(
                f"{where} is kept: the recipe reads its outputs, which backward keeps anyway, instead "
                "of rerunning it; set it back to save"
            )
        if o.decision is Decision.SAVE and o.forced is not None and o.forced is not Forced.KEPT:
            raise InputError(f"{where} cannot be saved ({o.forced.value}); set it back to recompute")


def _autocast_field(value: object) -> str:
    if value not in ("", "bfloat16", "float16"):
        raise InputError(f"autocast: {value!r} is not an autocast dtype (bfloat16 or float16); re-solve the plan")
    return str(value)
