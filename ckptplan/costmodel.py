"""What checkpointing costs in time: each recomputed op, and the runtime around each checkpointed region.

FLOPs alone say that recomputing a GELU, a LayerNorm or a transpose-copy is free. It is not: those ops
are memory bound, and on CPU (or in eager mode on any device) each op also pays a dispatch overhead.
The planner minimises this estimate; FLOPs (torch.utils.flop_counter's formulas, 2 per FMA) are
reported beside it, never mixed into it. An op is priced by a roofline at its class's rates
(``cost_ns``) unless it was measured apart: those carry a line of their own (``OpRate``; on the CPU a
convolution, whose thin shapes pay mostly a fixed part and oneDNN's layout reorders, BatchNorm and GELU).

The runtime (runtime.py) adds its own cost, which is charged too:

* every checkpointed region pays one ``torch.utils.checkpoint`` call (the RNG state kept and restored,
  the recomputation's frame), ``checkpoint_call_ns``, and Python's saved-tensor hooks on each of its
  ops, in forward and in the recomputation, ``checkpoint_op_ns``;
* a region that saves some of its ops runs under selective checkpointing's dispatch modes, set up once
  a region (``sac_call_ns``: its policy's contexts, the modes entered in forward and again in the
  recomputation), which call a Python policy for every op in forward (``sac_forward_ns``) and walk every
  op again in the recomputation, cached or rerun (``sac_replay_ns``). A region that saves nothing runs
  as plain ``torch.utils.checkpoint`` and pays none of it;
* a rematerialization (solver/remat.py) pays ``remat_ns`` (its target's storage registered, its
  saved-tensor handles packed and unpacked, the rebuild), ``remat_op_ns`` an op of its recipe (recorded
  with its arguments in forward, replayed from Python in backward) and its ops' hooks. Two costs are
  shared: the module call it counts its recipe in runs one pass-through dispatch mode, however many
  recipes it holds, ``remat_visit_ns`` on each of the call's forward ops; and a plan that
  rematerializes anything looks up every tensor autograd saves in the model's forward in one
  saved-tensor hook, ``remat_pack_ns`` each (``Region.shared``: paid once however many regions carry
  it).

Those overheads are Python on the host. On the CPU they add to the step. On a GPU (``asynchronous``),
kernels run behind the host, so host time costs only where it is longer than the kernels it launches:
a region is charged the host time it exposes beyond the device time of its ops (forward and rerun), so
selective checkpointing is nearly free around large kernels and costly around small ones.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

# Memory-bound ops that reduce, normalise or evaluate a transcendental per element: on a CPU they run well
# below the rate of an add (their measured rates: docs/calibration.md). Aten op names, without namespace and
# overload.
BATCH_NORMS = ("native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training")
SLOW_OPS = frozenset(
    {
        *BATCH_NORMS,
        "native_layer_norm",
        "native_group_norm",
        "_softmax",
        "_safe_softmax",
        "_log_softmax",
        "gelu",
        "max_pool2d_with_indices",
        "avg_pool2d",
        "mean",
        "embedding",
    }
)


def is_slow(op_name: str) -> bool:
    """Whether a traced op (``aten.native_batch_norm.default``, as ``OpRecord.name`` and the plan file
    write it) is one of SLOW_OPS."""
    parts = op_name.split(".")
    return len(parts) > 1 and parts[1] in SLOW_OPS


@dataclass(frozen=True, slots=True, kw_only=True)
class OpRate:
    """An op priced apart from its class, by a line fitted to its own times: ``fixed_ns`` a call (beside
    every op's ``op_overhead_ns``), plus its FLOPs at ``flops_per_s`` (None: not charged) and its traffic
    at ``bytes_per_s``, added rather than the larger taken. A roofline suits ops whose time one resource
    bounds; a CPU convolution pays for both (oneDNN reorders its input and output to and from a blocked
    layout, then computes), and the zoo's thin ones mostly for the reorders."""

    op: str  # aten name without namespace and overload: "convolution"
    bytes_per_s: float
    flops_per_s: float | None = None
    fixed_ns: int = 0

    def __post_init__(self) -> None:
        if not self.op or "." in self.op:
            raise ValueError(
                f"op rate {self.op!r}: name the aten op without namespace and overload "
                "('convolution', not 'aten.convolution.default')"
            )
        for field, value in (("bytes_per_s", self.bytes_per_s), ("flops_per_s", self.flops_per_s or 1)):
            if value <= 0:
                raise ValueError(f"op rate {self.op!r}: {field} must be > 0, got {value}")
        if self.fixed_ns < 0:
            raise ValueError(f"op rate {self.op!r}: fixed_ns must be >= 0, got {self.fixed_ns}")

    def seconds(self, flops: int, bytes_moved: int) -> float:
        """The op's time beyond every op's fixed overhead."""
        compute = flops / self.flops_per_s if self.flops_per_s else 0.0
        return self.fixed_ns / 1e9 + compute + bytes_moved / self.bytes_per_s


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceProfile:
    name: str
    flops_per_s: float  # sustained matmul throughput
    bytes_per_s: float  # sustained memory bandwidth
    random_bytes_per_s: float  # random numbers generated (dropout's mask, randn), in bytes of output
    op_overhead_ns: int  # launch / dispatch cost paid by every op, views included
    checkpoint_call_ns: int  # one checkpointed region call: RNG state, recomputation frame
    checkpoint_op_ns: int  # per op of a checkpointed region: saved-tensor hooks (pack, unpack, repack)
    sac_forward_ns: int  # per op of a selectively checkpointed region, in forward (policy + caching mode)
    sac_replay_ns: int  # per op its recomputation walks (cached or rerun), on top of the rerun itself
    sac_call_ns: int = 0  # per selectively checkpointed region: its policy's contexts and dispatch modes set up
    remat_visit_ns: int = 7_500  # per forward op of the module call a rematerialization's recipe is counted in
    asynchronous: bool = False  # kernels run behind the host (a GPU): host time hides behind device time
    slow_bytes_per_s: float | None = None  # memory traffic of SLOW_OPS; None: bytes_per_s
    # per rematerialization, beside its ops' hooks and records and its recipe mode's visits: its target's
    # storage registered, the saved tensors' handles packed and unpacked, the rebuild; None: checkpoint_call_ns
    remat_call_ns: int | None = None
    # per op of a rematerialization's recipe, on top of its hooks and its rerun as priced: recorded in
    # forward (its arguments flattened, its tensors aliased or referenced) and replayed in backward
    remat_op_ns: int = 0
    # per tensor autograd saves in the model's forward (Graph.saved_tensors), once a plan rematerializes
    # anything: the saved-tensor hook that looks each one up, packed and unpacked
    remat_pack_ns: int = 0
    # ops whose reruns were measured apart from their class, each at its own rates (OpRate)
    op_rates: tuple[OpRate, ...] = ()

    def __post_init__(self) -> None:
        if (
            min(self.flops_per_s, self.bytes_per_s, self.random_bytes_per_s, self.slow_bytes_per_s or 1) <= 0
            or min(
                self.op_overhead_ns,
                self.checkpoint_call_ns,
                self.checkpoint_op_ns,
                self.sac_forward_ns,
                self.sac_replay_ns,
                self.sac_call_ns,
                self.remat_visit_ns,
                self.remat_pack_ns,
                self.remat_op_ns,
            )
            < 0
        ):
            raise ValueError(f"device profile {self.name!r} needs positive rates and overheads >= 0")
        names = [r.op for r in self.op_rates]
        if len(set(names)) != len(names):
            raise ValueError(f"device profile {self.name!r} gives an op more than one rate: {sorted(names)}")

    @property
    def remat_ns(self) -> int:
        """What one rematerialization costs beside its ops' hooks and its recipe mode's visits."""
        return self.checkpoint_call_ns if self.remat_call_ns is None else self.remat_call_ns

    def cost_ns(self, *, flops: int, bytes_moved: int, is_view: bool, random_bytes: int = 0, op: str = "") -> int:
        """Estimated time of one op: max(compute, memory traffic, random numbers) + overhead, or for an op with
        a line of its own (``op_rates``) max(its line, random numbers) + overhead. Views move no data.
        ``random_bytes``: the output a random op draws (0 for the others). ``op``: its aten name without
        namespace and overload (``convolution``): the traffic of an op without a line moves at
        ``slow_bytes_per_s`` for SLOW_OPS, else at ``bytes_per_s``."""
        if is_view:
            return self.op_overhead_ns
        drawn = random_bytes / self.random_bytes_per_s
        own = self.op_rate(op)
        if own is not None:
            return self.op_overhead_ns + int(round(max(own.seconds(flops, bytes_moved), drawn) * 1e9))
        compute = flops / self.flops_per_s
        traffic = bytes_moved / ((self.slow_bytes_per_s or self.bytes_per_s) if op in SLOW_OPS else self.bytes_per_s)
        return self.op_overhead_ns + int(round(max(compute, traffic, drawn) * 1e9))

    def op_rate(self, op: str) -> OpRate | None:
        """The rates an op named ``op`` (aten, without namespace and overload) is priced at apart from its
        class, if any."""
        return next((r for r in self.op_rates if r.op == op), None)

    def device_ns(self, cost_ns: int) -> int:
        """The part of an op's estimate that runs on the device (its estimate less the launch overhead)."""
        return max(0, cost_ns - self.op_overhead_ns)

    def region_ns(self, *, num_ops: int, num_rerun: int, device_ns: int, remat: bool = False) -> tuple[int, int]:
        """(checkpointing a region at all, selective checkpointing on top) beyond the ops it reruns, for
        a region of ``num_ops`` forward ops whose recomputation walks ``num_rerun`` of them (early stop)
        and whose ops run ``device_ns`` on the device in forward and rerun together. ``remat``: a
        rematerialization's recipe, which pays ``remat_ns`` instead of a checkpoint call and
        ``remat_op_ns`` an op."""
        eager = (num_ops + num_rerun) * self.op_overhead_ns
        plain = (
            self.remat_ns + num_ops * (self.checkpoint_op_ns + self.remat_op_ns)
            if remat
            else self.checkpoint_call_ns + num_ops * self.checkpoint_op_ns
        )
        selective = self.sac_call_ns + num_ops * self.sac_forward_ns + num_rerun * self.sac_replay_ns
        if not self.asynchronous:
            return plain, selective

        def exposed(host: int) -> int:  # host time the device does not hide
            return max(0, host - device_ns)

        return (exposed(eager + plain) - exposed(eager), exposed(eager + plain + selective) - exposed(eager + plain))


# NOTE [ CPU calibration ]
# Each constant of CPU is measured where it is paid: decisions applied to the example models' real training
# steps on the 2-core x86_64 CPU the benchmarks run on (benchmarks/calibration/region_costs.py, op_rates.py,
# runtime_overhead.py). Reruns are priced at in-step rates, a rerun's forward-pass rate divided by what a
# rerun pays beyond it (its inputs read back from memory, the runtime's Python between kernels with cold
# caches), so they cost well above tight-loop figures. Convolutions, BatchNorm and GELU stray from their
# class and get lines of their own (OpRate): priced as their class, the solver picks the ops it underprices
# most. The runtime's overheads (checkpoint_call_ns to remat_pack_ns) are fitted to what those steps add
# beyond the reruns. What each constant measured, the fit's error and how to check it on another CPU:
# docs/calibration.md.
CPU = DeviceProfile(
    name="cpu",
    flops_per_s=123e9,
    bytes_per_s=70e9,
    random_bytes_per_s=0.85e9,
    op_overhead_ns=5_000,
    checkpoint_call_ns=473_000,
    checkpoint_op_ns=8_000,
    sac_forward_ns=14_800,
    sac_replay_ns=14_800,
    sac_call_ns=700_000,
    remat_call_ns=132_000,
    remat_op_ns=131_000,
    remat_visit_ns=6_100,
    remat_pack_ns=6_300,
    slow_bytes_per_s=2.4e9,
    op_rates=(
        OpRate(op="gelu", bytes_per_s=8e9),
        OpRate(op="convolution", fixed_ns=117_000, flops_per_s=443e9, bytes_per_s=7.58e9),
        *(OpRate(op=bn, bytes_per_s=3.4e9) for bn in BATCH_NORMS),
    ),
)
# An H100-class GPU in eager mode, from its datasheet orders of magnitude (uncalibrated;
# benchmarks/calibration/gpu_calibrate.py measures a card): bf16 dense ~600 TFLOP/s sustained, ~2.5 TB/s (random numbers
# at that rate too), ~8 us a launch. The runtime's overheads are Python on the host, charged where they are
# longer than the kernels they launch; the host's caches are not shared with the device's kernels, so they
# are the CPU's tight-loop figures (benchmarks/calibration/runtime_overhead.py), not its in-step ones.
GPU = DeviceProfile(
    name="cuda",
    flops_per_s=600e12,
    bytes_per_s=2.5e12,
    random_bytes_per_s=2.5e12,
    op_overhead_ns=8_000,
    checkpoint_call_ns=90_000,
    checkpoint_op_ns=10_000,
    sac_forward_ns=30_000,
    sac_replay_ns=30_000,
    asynchronous=True,
)


def profile_for(device_type: str) -> DeviceProfile:
    """The default profile for a device type; meta and fake tensors are planned for a GPU."""
    return CPU if device_type == "cpu" else GPU


def profile_of(graph: Any) -> DeviceProfile:
    """The profile a graph's ops are priced with (``price``), else its device type's default."""
    return graph.profile if graph.profile is not None else profile_for(graph.device)


def price(graph: Any, profile: DeviceProfile) -> Any:
    """``graph`` with every op's ``cost_ns`` estimated by ``profile``: the trace records what an op does
    (FLOPs, bytes, views, random numbers), a profile says what that costs on a device."""
    if profile is graph.profile:
        return graph
    ops = tuple(
        replace(
            op,
            cost_ns=profile.cost_ns(
                flops=op.flops if op.cost_flops is None else op.cost_flops,
                bytes_moved=op.bytes_moved,
                is_view=op.view,
                random_bytes=max((o.nbytes for o in op.outputs), default=0) if op.random else 0,
                op=op.name.split(".")[1] if "." in op.name else op.name,
            ),
        )
        for op in graph.ops
    )
    return replace(graph, ops=ops, profile=profile, _cache={})


_PROFILE_FIELDS = {f.name for f in fields(DeviceProfile)}
_RATE_FIELDS = {f.name for f in fields(OpRate)}


def profile_to_dict(profile: DeviceProfile) -> dict[str, Any]:
    """A profile as plain data (the profile file's content)."""
    out = asdict(profile)
    out["op_rates"] = [{k: v for k, v in r.items() if v is not None} for r in out["op_rates"]]
    return {k: v for k, v in out.items() if v is not None}


def profile_from_dict(data: Any, source: str = "profile") -> DeviceProfile:
    """The inverse of ``profile_to_dict``; every field checked, unknown ones refused."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: a device profile is a mapping of DeviceProfile fields")
    unknown = sorted(set(data) - _PROFILE_FIELDS - {"measured"})
    if unknown:
        raise ValueError(f"{source}: unknown profile fields {unknown}; known: {sorted(_PROFILE_FIELDS)}")
    values = {k: v for k, v in data.items() if k != "measured"}
    rates = values.pop("op_rates", []) or []
    if not isinstance(rates, list) or not all(isinstance(r, dict) and set(r) <= _RATE_FIELDS for r in rates):
        raise ValueError(f"{source}: op_rates must be a list of mappings with fields {sorted(_RATE_FIELDS)}")
    for k, v in values.items():
        if k == "name":
            if not isinstance(v, str) or not v:
                raise ValueError(f"{source}: name must be a non-empty string")
        elif k == "asynchronous":
            if not isinstance(v, bool):
                raise ValueError(f"{source}: asynchronous must be true or false")
        elif v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise ValueError(f"{source}: {k} must be a finite number, got {v!r}")
    try:
        return DeviceProfile(**values, op_rates=tuple(OpRate(**r) for r in rates))
    except TypeError as e:
        raise ValueError(f"{source}: {e}") from None


def load_profile(path: str | Any) -> DeviceProfile:
    """A profile file (YAML or JSON) as ``benchmarks/calibration/gpu_calibrate.py`` writes it."""
    from pathlib import Path

    import yaml

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"profile file {str(p)!r} does not exist or is not a regular file")
    if p.stat().st_size > 1 << 20:
        raise ValueError(f"profile file {str(p)!r} is over 1 MiB: not a device profile")
    try:
        data = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"profile file {str(p)!r} is not YAML or JSON: {e}") from None
    return profile_from_dict(data, source=str(p))
