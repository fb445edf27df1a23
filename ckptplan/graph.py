"""The traced activation graph: pure records, no torch import.

A ``Graph`` is one training step of one model on one input spec, as the tracer saw it:

* ``ops``: every aten op of the forward (and of the loss), in execution order. Op ``i`` is event ``i``.
* ``num_events``: forward events followed by backward events (backward ops are events too, but only
  their memory effect is kept: allocations and frees of storages).
* ``storages``: every storage alive at some point of the step with its baseline lifetime
  ``[alloc_event, free_event)`` (event indices; ``-1`` for storages that exist before the step,
  ``free_event = num_events`` for storages still alive at the end) and the facts the planner needs
  (who allocated it, which region's ops saved it for backward, when Python would drop it).
* ``modules``: one record per module call, with the span of forward ops it ran.
* ``unpacks``: the backward event at which autograd first unpacked a tensor saved inside each module
  call, i.e. the moment checkpointing would recompute that call.

Memory is counted the way ``torch.distributed._tools.mem_tracker.MemTracker`` counts it: the sum of the
sizes of live storages, sampled after every op.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class StorageKind(str, Enum):
    PARAM = "param"
    BUFFER = "buffer"
    INPUT = "input"
    ACTIVATION = "activation"  # allocated by a forward op
    BACKWARD = "backward"  # allocated by a backward op (temporaries)
    GRAD = "grad"  # a parameter's .grad at the end of the step


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorInfo:
    """One tensor output of an op."""

    storage: int  # id of the storage it lives in
    shape: tuple[int, ...]
    dtype: str  # "float32", "bfloat16", ...
    nbytes: int  # numel * element size (the logical size, not the storage size)


@dataclass(frozen=True, slots=True, kw_only=True)
class OpNode:
    """One forward aten op."""

    index: int  # position in the forward; also its event index
    name: str  # "aten.mm.default"
    module: str  # path of the innermost module running it ("" for the root or the loss)
    outputs: tuple[TensorInfo, ...]
    inputs: tuple[int, ...]  # storage ids of the tensor inputs, in argument order, deduplicated
    allocates: tuple[int, ...]  # storage ids this op created
    mutates: tuple[int, ...]  # storage ids this op wrote in place
    flops: int  # torch.utils.flop_counter formula, 0 when it has none
    bytes_moved: int  # bytes read plus bytes written (logical sizes)
    cost_ns: int  # estimated run time of the op (see costmodel.py), by the profile the graph is priced with
    random: bool  # consumes the RNG (nondeterministic_seeded)
    view: bool  # every output aliases an input storage
    cost_flops: int | None = None  # FLOPs the time estimate charges, where they differ from ``flops``


@dataclass(frozen=True, slots=True, kw_only=True)
class StorageInfo:
    id: int
    nbytes: int
    kind: StorageKind
    alloc_event: int  # -1 when it exists before the step
    free_event: int  # first event at which it is no longer alive; num_events if it survives the step
    producer: int | None  # forward op that allocated it
    saved_by: tuple[str, ...]  # module paths of the ops that saved it for backward (sorted, unique)
    python_free_op: int  # forward op after which Python drops it if autograd keeps no reference
    first_pack_event: int | None = None  # forward ops completed when autograd first saved it (None: never)
    last_pack_event: int | None = None  # the same, when it last saved it
    first_unpack_event: int | None = None  # backward event of the first unpack of it (None: never unpacked)


@dataclass(frozen=True, slots=True, kw_only=True)
class ModuleCall:
    path: str  # "transformer.h.3" ("" is the root)
    type_name: str  # "Block"
    call_index: int  # 0 for the first call of this module in the step
    first_op: int  # first forward op inside the call
    end_op: int  # one past the last forward op inside the call
    input_storages: tuple[int, ...]  # storages of the tensor arguments
    recompute_end_op: int  # early stop: recomputing the call reruns ops [first_op, recompute_end_op)
    first_unpack_event: int | None  # backward event of the first unpack of a tensor saved inside
    last_unpack_event: int | None  # backward event of the last such unpack


# NOTE [ Data-dependent spans ]
# A mixture of experts' eager loop runs ``nonzero`` on its routing and then one iteration per expert hit,
# each over as many tokens as the router sent it: from that op to the end of the module call running it,
# the number of ops and their shapes change from batch to batch. A plan must hold for any batch, so in
# such a span nothing is identified by its position or shape: no op there is saved by selective
# checkpointing or rebuilt by a rematerialization, no module called inside it is checkpointed on its own,
# and a checkpoint around the whole call recomputes it as it ran (torch's checkpoint replays the same
# routing from the same inputs). The runtime checks a region's ops only up to its first such op.
@dataclass(frozen=True, slots=True, kw_only=True)
class Span:
    """Forward ops [start, end) whose number and shapes depend on data: from a data-dependent op to the
    end of the innermost module call ``owner`` running it."""

    start: int
    end: int
    owner: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Graph:
    model_name: str
    signature: str  # signature.model_signature of the traced model
    num_parameters: int
    inputs: tuple[str, ...]  # "float32[8, 1024]" per tensor argument, in order
    device: str  # the device type the step is planned for: "cuda" or "cpu" (target.Target)
    ops: tuple[OpNode, ...]
    storages: tuple[StorageInfo, ...]
    modules: tuple[ModuleCall, ...]
    num_events: int
    module_tree: tuple[tuple[str, str], ...] = ()  # (path, type name) of every module, called or not
    tensor_names: tuple[tuple[int, str], ...] = ()  # storage id -> parameter or buffer name
    optimizer: str | None = None
    optimizer_state_bytes: int = 0  # constant added to every event when an optimizer is named
    # constant the trace does not see: cuBLAS's workspace on CUDA, DDP buckets, FSDP all-gather buffers
    extra_fixed_bytes: int = 0
    parallel: str = ""  # "" (one process), "ddp:N" or "fsdp:N" (see parallel.py)
    torch_version: str = ""
    # tensors autograd saved during the model's forward (each pack; the loss's, outside it, not counted):
    # what a rematerialization's saved-tensor hook looks up (costmodel.remat_pack_ns); 0 when unknown
    saved_tensors: int = 0
    gpu: str = ""  # the GPU a cuda step is planned for ("h100", "sm86"); "" for cpu
    gpu_capability: tuple[int, int] | None = None
    traced_on: str = ""  # the tensors the trace ran: "meta", "fake", "cpu" or "cuda"
    sdpa_backends: tuple[str, ...] = ()  # attention kernels a meta or fake cuda trace chose
    autocast: str = ""  # torch.autocast's dtype around forward and loss ("bfloat16", "float16"); "" for none
    eval_modules: tuple[str, ...] = ()  # modules in eval mode during the traced step (frozen BatchNorm, ...)
    # forward ops whose output shape depends on tensor values (``nonzero``, boolean indexing): a mixture of
    # experts' routing. See NOTE [ Data-dependent spans ].
    data_dependent_ops: tuple[int, ...] = ()
    # the costmodel.DeviceProfile the ops' cost_ns were priced with (costmodel.price); None: the default
    # profile of ``device``
    profile: Any = field(default=None, compare=False, repr=False)
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for i, op in enumerate(self.ops):
            if op.index != i:
                raise ValueError(f"ops[{i}].index is {op.index}; ops must be numbered in order")
        if self.num_events < len(self.ops):
            raise ValueError("num_events must count the forward ops and the backward events")
        dd = self.data_dependent_ops
        if any(b <= a for a, b in zip(dd, dd[1:])) or any(not 0 <= i < len(self.ops) for i in dd):
            raise ValueError("data_dependent_ops must be increasing forward op indices")

    # ---- derived facts -----------------------------------------------------------------------
    @property
    def num_forward(self) -> int:
        return len(self.ops)

    def _memo(self, key: str, compute):
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    @property
    def param_bytes(self) -> int:
        return self._memo("param_bytes", lambda: sum(s.nbytes for s in self.storages if s.kind is StorageKind.PARAM))

    @property
    def forward_flops(self) -> int:
        return self._memo("forward_flops", lambda: sum(op.flops for op in self.ops))

    @property
    def forward_cost_ns(self) -> int:
        return self._memo("forward_cost_ns", lambda: sum(op.cost_ns for op in self.ops))

    def memory_timeline(self) -> list[int]:
        """Baseline (no checkpointing) live bytes after each event, optimizer state included."""
        if "timeline" not in self._cache:
            delta = [0] * (self.num_events + 1)
            for s in self.storages:
                lo = max(s.alloc_event, 0)  # storages that exist before the step are live from event 0
                if s.free_event > lo:
                    delta[lo] += s.nbytes
                    delta[s.free_event] -= s.nbytes
            out, cur = [], self.optimizer_state_bytes + self.extra_fixed_bytes
            for e in range(self.num_events):
                cur += delta[e]
                out.append(cur)
            self._cache["timeline"] = out
        return self._cache["timeline"]

    @property
    def baseline_peak_bytes(self) -> int:
        return max(self.memory_timeline(), default=self.optimizer_state_bytes + self.extra_fixed_bytes)

    def data_dependent_spans(self) -> tuple["Span", ...]:
        """The forward ops whose position or shape depends on tensor values, as spans (see the NOTE)."""
        return self._memo("data_dependent_spans", self._spans)

    def _spans(self) -> tuple["Span", ...]:
        out: list[Span] = []
        for i in self.data_dependent_ops:
            if out and out[-1].start <= i < out[-1].end:
                continue  # inside the span of an earlier data-dependent op of the same call
            owner = min(
                (m for m in self.modules if m.path == self.ops[i].module and m.first_op <= i < m.end_op),
                key=lambda m: m.end_op - m.first_op,
                default=None,
            )
            if owner is None:  # outside every module call (the loss): to the end of the forward
                out.append(Span(start=i, end=len(self.ops), owner=self.ops[i].module))
            else:
                out.append(Span(start=i, end=owner.end_op, owner=owner.path))
        return tuple(out)

    def module_call(self, path: str) -> ModuleCall:
        for m in self.modules:
            if m.path == path:
                return m
        raise KeyError(path)

    @property
    def fingerprint(self) -> str:
        """Hash of what a plan depends on: the op sequence with modules, shapes and dtypes (in a data-dependent
        span, its first op only)."""
        return self._memo("fingerprint", self._fingerprint)

    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        head: list = [self.inputs, self.optimizer, self.parallel]
        if self.device != "cpu":  # a GPU step's blocks are rounded: another step than the CPU one
            head += [self.device, self.gpu]
        h.update(json.dumps(head, sort_keys=True).encode())
        # the ops of data-dependent spans differ from batch to batch; the plan depends on where they start
        spans = self.data_dependent_spans()
        starts = {sp.start for sp in spans}
        varies = {i for sp in spans for i in range(sp.start + 1, sp.end)}
        for op in self.ops:
            if op.index in varies:
                continue
            if op.index in starts:
                h.update(json.dumps([op.name, op.module]).encode())
                continue
            outs = [[list(t.shape), t.dtype] for t in op.outputs]
            h.update(json.dumps([op.name, op.module, outs]).encode())
        return h.hexdigest()[:16]


# ---- names a plan gives what it decides about -------------------------------------------------------------

CONTAINERS = frozenset({"ModuleList", "Sequential", "ModuleDict"})


class Forced(str, Enum):
    """Why an op's decision is fixed: every reason but ``KEPT`` is why it cannot be saved."""

    VIEW = "view"  # aliases an input: recomputing it is free, caching it would pin its base
    RANDOM = "random"  # caching it would shift the RNG stream for the random ops recomputed after it
    INPLACE = "inplace"  # writes or is later written in place: a cached tensor must never be mutated
    NO_OUTPUT = "no-output"  # allocates nothing worth keeping
    AFTER_LAST_SAVE = "not-recomputed"  # early stop ends the recomputation before this op
    RECIPE = "recipe"  # an op of a rematerialization's recipe (remat.py): rerun to rebuild its target
    # an op amid a recipe that the recipe does not rerun: its outputs, which backward keeps anyway (the
    # shortcut convolution of a ResNet block), are read as inputs; its decision is save
    KEPT = "kept"
    # at or after a data-dependent op (NOTE [ Data-dependent spans ]): its position and shape change with
    # the data, so it is recomputed as the region's checkpoint reruns it, never identified by position
    DATA_DEPENDENT = "data-dependent"


def parse_path(path: str) -> tuple[str, int]:
    """(module, offset) of a rematerialization's path: ``<module>.@<offset>[:k]``, or for a longer recipe
    ``<shorter recipe's path>.~<n>@<offset>[:k]``, its module ``n`` levels above the shorter one's (the
    module the run counts its ops in)."""
    head, _, tail = path.rpartition("@")
    offset = int(tail.split(":")[0])
    if ".~" in head:
        under, levels = head.rsplit(".~", 1)
        parts = module_parts(parse_path(under)[0])
        return ".".join(parts[: len(parts) - int(levels)]), offset
    return (head[:-1] if head.endswith(".") else head), offset


def module_parts(module: str) -> list[str]:
    return module.split(".") if module else []
