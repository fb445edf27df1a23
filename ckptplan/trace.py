"""The only module that runs the model to observe it.

``trace(model, *args, **kwargs)`` runs one training step twice under a recording dispatch mode (recorder.py):

1. *lifetime pass*: forward + loss with a saved-tensor hook that keeps nothing. What Python alone keeps
   alive is then visible, which is exactly what a checkpointed region keeps during its forward.
2. *step pass*: forward + loss + backward, unchanged. Records every op, every storage's lifetime
   (weak references with callbacks, as MemTracker does), which module saved which tensor for backward,
   and when backward first unpacks each module call's saved tensors.

It works on real tensors, on the meta device and under ``FakeTensorMode``. On real tensors it restores
the model's buffers (BatchNorm statistics), its ``.grad`` fields and the RNG state afterwards.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from . import costmodel
from .autocast import dtype_name, parse_autocast
from .errors import InputError
from .graph import Graph, ModuleCall, StorageInfo, StorageKind
from .kernels import CpuKernels, CudaKernels
from .modes import eval_modules, no_kv_cache
from .recorder import Recorder
from .signature import model_signature, num_parameters
from .target import GpuSpec, SdpaBackend, Target, parse_gpu, parse_sdpa, parse_target

LossFn = Callable[[Any], torch.Tensor]

aten = torch.ops.aten

OPTIMIZER_STATE_FACTOR = {"sgd": 0, "momentum": 1, "adam": 2, "adamw": 2, "adagrad": 1, "rmsprop": 1}


def default_loss(out: Any) -> torch.Tensor:
    """The scalar a training step backpropagates: ``out.loss``, a scalar output, or a sum of outputs."""
    loss = getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    if isinstance(out, torch.Tensor):
        return out if out.dim() == 0 else out.sum()
    leaves, _ = tree_flatten(out.to_tuple() if hasattr(out, "to_tuple") else out)
    parts = [t.sum() for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    if not parts:
        raise InputError("the model output has no tensor that requires grad; pass loss_fn= to trace()")
    return torch.stack(parts).sum() if len(parts) > 1 else parts[0]


class _StepState:
    """Saves and restores what a traced step would otherwise change on a real model."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.grads = {p: p.grad for p in model.parameters()}
        self.real = not any(
            t.device.type == "meta" or _is_fake(t) for t in list(model.parameters()) + list(model.buffers())
        )
        self.buffers = {b: b.detach().clone() for b in model.buffers()} if self.real else {}
        self.rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def reset_rng(self) -> None:
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)

    def clear_grads(self) -> None:
        for p in self.grads:
            p.grad = None

    def restore(self) -> None:
        with torch.no_grad():
            for b, v in self.buffers.items():
                b.copy_(v)
        for p, g in self.grads.items():
            p.grad = g
        self.reset_rng()


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def _module_names(model: nn.Module) -> dict[int, str]:
    names: dict[int, str] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), name)
    return names


@contextlib.contextmanager
def _autocast(where: "_Where", dtype: torch.dtype | None, kernels: CudaKernels | CpuKernels | None):
    """The autocast region of a step: forward and loss, not backward (as ``with torch.autocast(...)`` in a
    training loop). Real tensors run torch's own autocast; a meta or fake trace for CUDA sets CUDA's
    thread-local autocast state, which ``CudaKernels`` reads (autocast.py)."""
    if dtype is None:
        yield
        return
    if where.traced_on not in ("meta", "fake"):
        with torch.autocast(device_type=where.traced_on, dtype=dtype):
            yield
        return
    assert isinstance(kernels, CudaKernels)
    enabled, before = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    try:
        yield
    finally:
        torch.set_autocast_enabled("cuda", enabled)
        torch.set_autocast_dtype("cuda", before)
        kernels.autocast.clear()


def _run_pass(
    model,
    args,
    kwargs,
    loss_fn,
    names,
    profile,
    kernels: CudaKernels | CpuKernels | None,
    where: "_Where",
    autocast: torch.dtype | None,
    *,
    keep_saved: bool,
):
    # Each pass sees what one step sees: autocast casts the weights again (its cache lives per context).
    torch.clear_autocast_cache()
    rec = Recorder(names, profile, where.target)
    for p in model.parameters():
        rec.storage_id(p, StorageKind.PARAM, None)
    for b in model.buffers():
        rec.storage_id(b, StorageKind.BUFFER, None)
    for t in tree_flatten((args, kwargs))[0]:
        if isinstance(t, torch.Tensor):
            rec.storage_id(t, StorageKind.INPUT, None)
    # per-module hooks, with keyword arguments: a checkpoint holds those inputs too (a Hugging Face layer
    # takes hidden_states=...), which a global pre-hook would not see
    hooks_on = []
    for m in model.modules():
        hooks_on.append(m.register_forward_pre_hook(rec.pre_hook, with_kwargs=True))
        hooks_on.append(m.register_forward_hook(rec.post_hook, always_call=True))
    try:
        if keep_saved:
            hooks = torch.autograd.graph.saved_tensors_hooks(rec.pack, rec.unpack)
        else:
            hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: None, _no_unpack)
        with hooks, kernels if kernels is not None else contextlib.nullcontext(), rec:
            with _autocast(where, autocast, kernels):
                out = model(*args, **kwargs)
                if getattr(out, "past_key_values", None) is not None:
                    raise InputError(
                        "the model returned a KV cache (Hugging Face use_cache=True): a recomputed "
                        "layer would append to it again and rerun other ops. Call it with "
                        "use_cache=False (or set model.config.use_cache = False) for training"
                    )
                loss = loss_fn(out)
                del out
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise InputError("loss_fn must return a scalar tensor")
            if not loss.requires_grad:
                raise InputError("the loss does not require grad: is the model in no_grad mode or frozen?")
            forward_events = rec.event
            if keep_saved:
                rec.backward = True
                loss.backward()
                rec.grads = {
                    rec.ids[p.grad.untyped_storage()]
                    for p in model.parameters()
                    if p.grad is not None and p.grad.untyped_storage() in rec.ids
                }
            del loss
    finally:
        for h in hooks_on:
            h.remove()
    return rec, forward_events


def _no_unpack(_: Any) -> torch.Tensor:
    raise RuntimeError("ckptplan lifetime pass: backward must not run")


@dataclass(frozen=True, slots=True)
class _Where:
    """What a trace runs on and what it stands for."""

    traced_on: str  # "meta", "fake", "cpu" or "cuda": the tensors the trace ran
    target: Target  # the device type the plan is for
    gpu: GpuSpec | None  # the GPU whose kernels a meta or fake trace stands in for


def _resolve_target(
    model: nn.Module, tensors: list[torch.Tensor], target: str | Target | None, gpu: str | GpuSpec | None
) -> _Where:
    every = tensors + list(model.parameters()) + list(model.buffers())
    if any(_is_fake(t) for t in every):
        traced_on = "fake"
    elif any(t.device.type == "meta" for t in every):
        traced_on = "meta"
    else:
        traced_on = next((t.device.type for t in every), "cpu")
    abstract = traced_on in ("meta", "fake")
    chosen = parse_target(target) or (Target.CUDA if abstract or traced_on == "cuda" else Target.CPU)
    if traced_on == "cuda" and chosen is not Target.CUDA:
        raise InputError(
            "a model on a CUDA device traces as itself: drop target= (or --target), or build the "
            "model on the meta device to plan for another device type"
        )
    if traced_on not in ("cuda", "meta", "fake") and chosen is Target.CUDA:
        raise InputError(
            f"target cuda needs the model on the meta device (or FakeTensorMode, or a real GPU), "
            f"not real {traced_on} tensors: build it with device='meta' (ckptplan's CLI: "
            f"-a device=meta) or plan for --target {traced_on}"
        )
    if chosen is Target.CUDA:
        spec = parse_gpu(gpu) if gpu is not None or traced_on != "cuda" else _local_gpu()
        return _Where(traced_on, chosen, spec)
    if gpu is not None:
        raise InputError("--gpu applies to a cuda target only; add --target cuda (on meta tensors)")
    return _Where(traced_on, chosen, None)


def _local_gpu() -> GpuSpec:
    """The GPU a real CUDA model runs on."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    name = props.name.lower().replace("nvidia ", "").replace(" ", "-")
    return GpuSpec(name=name, capability=(props.major, props.minor), memory_bytes=int(props.total_memory))


def trace(
    model: nn.Module,
    *args: Any,
    loss_fn: LossFn | None = None,
    optimizer: str | None = None,
    model_name: str | None = None,
    target: str | Target | None = None,
    gpu: str | GpuSpec | None = None,
    sdpa: str | SdpaBackend | None = None,
    autocast: str | torch.dtype | None = None,
    **kwargs: Any,
) -> Graph:
    """Trace one training step of ``model(*args, **kwargs)`` and return its activation graph.

    ``loss_fn`` maps the model output to the scalar to backpropagate (default: ``default_loss``).
    ``optimizer`` ("adamw", "adam", "sgd", ...) adds its state to the fixed memory.
    ``target``: the device type the plan is for, "cuda" or "cpu". The default is "cuda" for meta or fake
    tensors (the trace then takes CUDA's kernel decisions, see kernels.py) and for a real CUDA model, "cpu"
    for a real CPU model. ``gpu`` names the GPU a meta or fake trace plans for ("h100", "a100-40gb", "l4",
    ... or a compute capability such as "8.0"; default h100). ``sdpa`` forces an attention backend
    ("flash", "efficient", "cudnn", "math") where torch's own choice ("auto") is not the one your run
    makes (``torch.nn.attention.sdpa_kernel``). ``autocast`` ("bf16" or "fp16"): the forward and the loss
    run under ``torch.autocast(device_type, dtype)``, as in a mixed-precision training loop; on meta or
    fake tensors for a cuda target the trace makes the casts CUDA's autocast makes (autocast.py).
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"trace() needs an nn.Module, got {type(model).__name__}")
    if optimizer is not None and optimizer.lower() not in OPTIMIZER_STATE_FACTOR:
        raise InputError(f"unknown optimizer {optimizer!r}; choose one of {sorted(OPTIMIZER_STATE_FACTOR)}")
    loss_fn = loss_fn or default_loss
    tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    where = _resolve_target(model, tensors, target, gpu)
    backend = parse_sdpa(sdpa)
    if backend is not SdpaBackend.AUTO and where.target is not Target.CUDA:
        raise InputError("sdpa= chooses among CUDA's attention kernels: it needs a cuda target")
    if backend is not SdpaBackend.AUTO and where.traced_on not in ("meta", "fake"):
        raise InputError(
            "sdpa= chooses the attention kernel of a meta or fake trace; a real model runs "
            "the kernel torch picks (choose it with torch.nn.attention.sdpa_kernel)"
        )
    amp = parse_autocast(autocast)
    ambient = None  # trace() called inside the user's own torch.autocast on real tensors: the step runs in it
    if amp is None and where.traced_on in ("cpu", "cuda") and torch.is_autocast_enabled(where.traced_on):
        ambient = parse_autocast(torch.get_autocast_dtype(where.traced_on))
    if amp is not None and where.traced_on in ("meta", "fake") and where.target is not Target.CUDA:
        raise InputError(
            "autocast on meta or fake tensors stands in for CUDA's autocast: plan for --target "
            "cuda, or trace real CPU tensors to plan a CPU step under torch.autocast('cpu')"
        )
    profile = costmodel.profile_for(where.target.value)
    names = _module_names(model)
    state = _StepState(model)

    def kernels() -> CudaKernels | CpuKernels | None:  # a fresh mode for each pass
        if where.traced_on not in ("meta", "fake"):
            return None  # real tensors run their device's own kernels
        if where.target is Target.CUDA:
            assert where.gpu is not None
            return CudaKernels(where.gpu, backend)
        return CpuKernels()

    with no_kv_cache(model):
        try:
            state.clear_grads()
            life, n_life = _run_pass(
                model, args, kwargs, loss_fn, names, profile, kernels(), where, amp, keep_saved=False
            )
            python_free = _python_free_by_position(life, n_life)
            del life
            state.reset_rng()
            step_kernels = kernels()
            rec, n_fwd = _run_pass(
                model, args, kwargs, loss_fn, names, profile, step_kernels, where, amp, keep_saved=True
            )
            state.clear_grads()  # drop the traced gradients so their storages die inside the trace
        finally:
            state.restore()
    if n_fwd != n_life:
        raise InputError(
            "the model ran a different number of ops in two identical forwards; "
            "ckptplan needs a forward whose op sequence does not change between calls"
        )
    chosen = getattr(step_kernels, "chosen", [])
    sdpa_used = sorted({b.value for b in chosen})
    return _build_graph(
        model,
        rec,
        n_fwd,
        python_free,
        tensors,
        where,
        optimizer,
        model_name or type(model).__name__,
        sdpa_used,
        dtype_name(amp or ambient),
    )


def _python_free_by_position(rec: Recorder, n_fwd: int) -> dict[tuple[int, int], int]:
    """For the k-th storage allocated by forward op i: the event after which Python dropped it."""
    out: dict[tuple[int, int], int] = {}
    for op in rec.ops:
        for k, sid in enumerate(op.allocates):
            free = rec.storages[sid].free_event
            out[(op.index, k)] = n_fwd if free is None else min(free, n_fwd)
    return out


MATMULS = frozenset({"mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "convolution"})


def _build_graph(
    model,
    rec: Recorder,
    n_fwd: int,
    python_free,
    tensors,
    where: _Where,
    optimizer,
    name,
    sdpa_used: list[str],
    autocast: str,
) -> Graph:
    num_events = rec.event
    position: dict[int, tuple[int, int]] = {}
    for op in rec.ops:
        for k, sid in enumerate(op.allocates):
            position[sid] = (op.index, k)
    storages = []
    for sid, s in enumerate(rec.storages):
        free = num_events if s.free_event is None else s.free_event
        pyfree = python_free.get(position.get(sid), free if free <= n_fwd else n_fwd)
        storages.append(
            StorageInfo(
                id=sid,
                nbytes=s.nbytes,
                kind=StorageKind.GRAD if sid in rec.grads else s.kind,
                alloc_event=s.alloc_event,
                free_event=free,
                producer=s.producer,
                saved_by=tuple(sorted(s.saved_by)),
                python_free_op=pyfree,
                first_pack_event=s.first_pack,
                last_pack_event=s.last_pack,
                first_unpack_event=s.first_unpack,
            )
        )
    modules = tuple(
        ModuleCall(
            path=c.path,
            type_name=c.type_name,
            call_index=c.call_index,
            first_op=c.first_op,
            end_op=c.end_op if c.end_op >= 0 else n_fwd,
            input_storages=c.input_storages,
            recompute_end_op=max(c.last_pack, c.first_op),
            first_unpack_event=min(c.unpacks) if c.unpacks else None,
            last_unpack_event=max(c.unpacks) if c.unpacks else None,
        )
        for c in rec.calls
    )
    names = []
    for pname, p in model.named_parameters(remove_duplicate=True):
        names.append((rec.ids[p.untyped_storage()], pname))
    for bname, b in model.named_buffers(remove_duplicate=True):
        names.append((rec.ids[b.untyped_storage()], bname))
    param_bytes = sum(s.nbytes for s in storages if s.kind is StorageKind.PARAM)
    opt = optimizer.lower() if optimizer else None
    # cuBLAS's workspace comes from the caching allocator at a stream's first matmul and stays
    workspace = (
        where.gpu.cublas_workspace_bytes
        if where.gpu is not None and any(op.name.split(".")[1] in MATMULS for op in rec.ops)
        else 0
    )
    return Graph(
        model_name=name,
        signature=model_signature(model),
        num_parameters=num_parameters(model),
        inputs=tuple(f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}" for t in tensors),
        device=where.target.value,
        gpu=where.gpu.name if where.gpu else "",
        gpu_capability=where.gpu.capability if where.gpu else None,
        traced_on=where.traced_on,
        sdpa_backends=tuple(sdpa_used),
        autocast=autocast,
        extra_fixed_bytes=workspace,
        ops=tuple(rec.ops),
        storages=tuple(storages),
        modules=modules,
        num_events=num_events,
        optimizer=opt,
        tensor_names=tuple(sorted(names)),
        module_tree=tuple((path, type(m).__name__) for path, m in model.named_modules()),
        eval_modules=eval_modules(model),
        data_dependent_ops=tuple(rec.data_dependent),
        optimizer_state_bytes=OPTIMIZER_STATE_FACTOR.get(opt, 0) * param_bytes if opt else 0,
        torch_version=torch.__version__,
        saved_tensors=sum(1 for stack in rec.packs if stack),
        profile=rec.profile,
    )
