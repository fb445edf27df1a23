"""The recording dispatch mode ``trace`` runs a step under: every op, every storage's lifetime, which
module call saved which tensor for backward and when backward unpacked it.

It holds weak references only (with callbacks, as MemTracker does), so it changes no lifetime.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.checkpoint import SAC_IGNORED_OPS
from torch.utils.weak import WeakIdKeyDictionary

from . import costmodel
from .flops import cost_flops, op_flops
from .graph import OpNode, StorageKind, TensorInfo
from .kernels import STANDS_FOR
from .opfacts import HIDDEN_WRITES, data_dependent
from .target import Target, cuda_block_bytes


def _storage_bytes(st: torch.UntypedStorage, target: Target) -> int:
    """A storage's bytes as the target's allocator counts them (NOTE [ CUDA caching allocator rounding ])."""
    return cuda_block_bytes(st.nbytes()) if target is Target.CUDA else st.nbytes()


@dataclass
class _Storage:
    nbytes: int
    kind: StorageKind
    alloc_event: int
    producer: int | None
    free_event: int | None = None
    saved_by: set[str] = field(default_factory=set)
    first_pack: int | None = None
    last_pack: int | None = None
    first_unpack: int | None = None


@dataclass
class _Call:
    path: str
    type_name: str
    call_index: int
    first_op: int
    input_storages: tuple[int, ...]
    end_op: int = -1
    last_pack: int = -1  # forward ops completed when the last tensor saved inside was packed
    unpacks: list[int] = field(default_factory=list)


class Recorder(TorchDispatchMode):
    """Records ops and storage lifetimes. Holds weak references only, so it changes no lifetime."""

    def __init__(self, names: dict[int, str], profile: costmodel.DeviceProfile, target: Target) -> None:
        super().__init__()
        self.names = names
        self.profile = profile
        self.target = target
        self.ids: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.refs: list[weakref.ref] = []
        self.storages: list[_Storage] = []
        self.ops: list[OpNode] = []
        self.event = 0
        self.backward = False
        self.stack: list[int] = []  # indices into calls of the module calls now running
        self.calls: list[_Call] = []
        self.call_counts: dict[str, int] = {}
        self.packs: list[tuple[int, ...]] = []  # the call stack at each pack
        self.grads: set[int] = set()  # storages that ended up as parameters' .grad
        self.pack_storage: list[int] = []
        self.data_dependent: list[int] = []  # forward ops whose output shape depends on data

    # ---- storages --------------------------------------------------------------------------------
    def storage_id(self, t: torch.Tensor, kind: StorageKind, producer: int | None) -> tuple[int, bool]:
        st = t.untyped_storage()
        sid = self.ids.get(st)
        if sid is not None:
            return sid, False
        sid = len(self.storages)
        self.ids[st] = sid
        alloc = -1 if kind in (StorageKind.PARAM, StorageKind.BUFFER, StorageKind.INPUT) else self.event
        self.storages.append(_Storage(_storage_bytes(st, self.target), kind, alloc, producer))
        self.refs.append(weakref.ref(st, self._freed_callback(sid)))
        return sid, True

    def _freed_callback(self, sid: int) -> Callable[[Any], None]:
        def freed(_: Any) -> None:
            self.storages[sid].free_event = self.event

        return freed

    # ---- module calls ------------------------------------------------------------------------------
    def pre_hook(self, module: nn.Module, args: Any, kwargs: Any | None = None) -> None:
        if self.backward:
            return
        path = self.names.get(id(module))
        if path is None:
            return
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        inputs = tuple(sorted({self.storage_id(t, StorageKind.INPUT, None)[0] for t in tensors}))
        n = self.call_counts.get(path, 0)
        self.call_counts[path] = n + 1
        self.stack.append(len(self.calls))
        self.calls.append(_Call(path, type(module).__name__, n, len(self.ops), inputs))

    def post_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.backward or id(module) not in self.names or not self.stack:
            return
        call = self.calls[self.stack.pop()]
        call.end_op = len(self.ops)

    def current_module(self) -> str:
        return self.calls[self.stack[-1]].path if self.stack else ""

    # ---- saved tensors ---------------------------------------------------------------------------
    def pack(self, t: torch.Tensor) -> tuple[int, torch.Tensor]:
        sid, _ = self.storage_id(t, StorageKind.ACTIVATION, None)
        st = self.storages[sid]
        st.saved_by.add(self.current_module())
        if st.first_pack is None:
            st.first_pack = self.event
        st.last_pack = self.event
        self.packs.append(tuple(self.stack))
        for c in self.stack:
            self.calls[c].last_pack = self.event
        self.pack_storage.append(sid)
        # A detached alias keeps the storage alive exactly as autograd would, without a ref cycle.
        return len(self.packs) - 1, t.detach()

    def unpack(self, packed: tuple[int, torch.Tensor]) -> torch.Tensor:
        pid, t = packed
        for c in self.packs[pid]:
            self.calls[c].unpacks.append(self.event)
        st = self.storages[self.pack_storage[pid]]
        if st.first_unpack is None:
            st.first_unpack = self.event
        return t

    # ---- ops -----------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in SAC_IGNORED_OPS:  # checkpoint ignores these too (detach); their outputs alias
            return out
        index = self.event
        kind = StorageKind.BACKWARD if self.backward else StorageKind.ACTIVATION
        producer = None if self.backward else index
        in_tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        in_ids = [self.storage_id(t, StorageKind.INPUT, None)[0] for t in in_tensors]
        out_tensors = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        outputs, allocates = [], []
        for t in out_tensors:
            sid, new = self.storage_id(t, kind, producer)
            if new:
                allocates.append(sid)
            if not self.backward:
                outputs.append(
                    TensorInfo(
                        storage=sid,
                        shape=tuple(int(d) for d in t.shape),
                        dtype=str(t.dtype).removeprefix("torch."),
                        nbytes=t.numel() * t.element_size(),
                    )
                )
        if not self.backward:
            if data_dependent(func, args):
                self.data_dependent.append(index)
            self.ops.append(
                self._op_node(func, args, kwargs, out, index, in_tensors, in_ids, tuple(outputs), tuple(allocates))
            )
        self.event += 1
        return out

    def _op_node(self, func, args, kwargs, out, index, in_tensors, in_ids, outputs, allocates) -> OpNode:
        mutated = []
        flat_args = list(args) + [kwargs.get(a.name) for a in func._schema.arguments[len(args) :]]
        for a, v in zip(func._schema.arguments, flat_args):
            if a.alias_info is not None and a.alias_info.is_write and isinstance(v, torch.Tensor):
                mutated.append(self.ids[v.untyped_storage()])
        positions, training = HIDDEN_WRITES.get(func, ((), None))
        if training is not None and len(args) > training and args[training]:
            for i in positions:
                if isinstance(args[i], torch.Tensor):
                    mutated.append(self.ids[args[i].untyped_storage()])
        flops = op_flops(func, args, kwargs, out)
        moved = sum(t.numel() * t.element_size() for t in in_tensors) + sum(o.nbytes for o in outputs)
        is_view = bool(outputs) and not allocates and not mutated
        random = torch.Tag.nondeterministic_seeded in func.tags
        drawn = max((o.nbytes for o in outputs), default=0) if random else 0  # dropout: its output, not its mask
        priced = cost_flops(func, args, kwargs, out, flops)
        return OpNode(
            index=index,
            name=STANDS_FOR.get(str(func), str(func)),
            module=self.current_module(),
            outputs=outputs,
            inputs=tuple(dict.fromkeys(in_ids)),
            allocates=allocates,
            mutates=tuple(mutated),
            flops=flops,
            bytes_moved=moved,
            cost_ns=self.profile.cost_ns(
                flops=priced, bytes_moved=moved, is_view=is_view, random_bytes=drawn, op=func._opname
            ),
            random=random,
            view=is_view,
            cost_flops=None if priced == flops else priced,
        )


__all__ = ["Recorder"]
