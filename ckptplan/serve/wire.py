"""The graph upload format: versioned JSON (gzip on the wire), validated field by field, no pickle.

One document carries the traced step(s) a plan is solved for::

    {"format": "ckptplan-graph", "version": 1, "graphs": [GRAPH, ...]}

Each GRAPH keeps every field of ``graph.Graph`` (so a decoded graph equals the traced one and has its
fingerprint) with its records as rows, not objects, and its repeated strings (op names, module paths,
dtypes) interned in a ``strings`` table that rows index::

    ops:      [name, module, outputs, inputs, allocates, mutates, flops, bytes_moved, cost_ns, random, view]
              (outputs: [[storage, shape, dtype, nbytes], ...]; an op's index is its row number)
    storages: [nbytes, kind, alloc_event, free_event, producer, saved_by, python_free_op,
               first_pack_event, last_pack_event, first_unpack_event]   (a storage's id is its row number)
    modules:  [path, type_name, call_index, first_op, end_op, input_storages, recompute_end_op,
               first_unpack_event, last_unpack_event]

Decoding checks types, ranges and references (every storage id, op index and event in range), so a
graph that decodes can be planned; every problem raises ``WireError`` naming the field, e.g.
``graphs[0].ops[12][3]: storage 9041 does not exist (the graph has 900 storages)``.
"""

from __future__ import annotations

import builtins
import gzip
import json
import zlib
from typing import Any, Sequence

from ..costmodel import profile_from_dict, profile_to_dict
from ..errors import InputError
from ..graph import Graph, ModuleCall, OpNode, StorageInfo, StorageKind, TensorInfo

FORMAT = "ckptplan-graph"
VERSION = 1
MAX_GRAPHS = 16  # input shapes one plan may hold for


class WireError(InputError):
    """An upload that is not a valid graph document; the message names the field."""


# ---- encoding -------------------------------------------------------------------------------------
class _Strings:
    def __init__(self) -> None:
        self.table: list[str] = []
        self.index: dict[str, int] = {}

    def __call__(self, s: str) -> int:
        if s not in self.index:
            self.index[s] = len(self.table)
            self.table.append(s)
        return self.index[s]


def graph_to_dict(g: Graph) -> dict[str, Any]:
    s = _Strings()
    ops = [
        [
            s(o.name),
            s(o.module),
            [[t.storage, list(t.shape), s(t.dtype), t.nbytes] for t in o.outputs],
            list(o.inputs),
            list(o.allocates),
            list(o.mutates),
            o.flops,
            o.bytes_moved,
            o.cost_ns,
            int(o.random),
            int(o.view),
        ]
        + ([] if o.cost_flops is None else [o.cost_flops])
        for o in g.ops
    ]
    storages = [
        [
            st.nbytes,
            st.kind.value,
            st.alloc_event,
            st.free_event,
            st.producer,
            [s(p) for p in st.saved_by],
            st.python_free_op,
            st.first_pack_event,
            st.last_pack_event,
            st.first_unpack_event,
        ]
        for st in g.storages
    ]
    modules = [
        [
            s(m.path),
            s(m.type_name),
            m.call_index,
            m.first_op,
            m.end_op,
            list(m.input_storages),
            m.recompute_end_op,
            m.first_unpack_event,
            m.last_unpack_event,
        ]
        for m in g.modules
    ]
    return {
        "model_name": g.model_name,
        "signature": g.signature,
        "num_parameters": g.num_parameters,
        "inputs": list(g.inputs),
        "device": g.device,
        "num_events": g.num_events,
        "module_tree": [[s(p), s(t)] for p, t in g.module_tree],
        "tensor_names": [[i, n] for i, n in g.tensor_names],
        "optimizer": g.optimizer,
        "optimizer_state_bytes": g.optimizer_state_bytes,
        "extra_fixed_bytes": g.extra_fixed_bytes,
        "parallel": g.parallel,
        "torch_version": g.torch_version,
        "saved_tensors": g.saved_tensors,
        "fingerprint": g.fingerprint,
        "strings": s.table,
        "ops": ops,
        "storages": storages,
        "modules": modules,
        "gpu": g.gpu,
        "gpu_capability": list(g.gpu_capability) if g.gpu_capability else None,
        "traced_on": g.traced_on,
        "sdpa_backends": list(g.sdpa_backends),
        "eval_modules": list(g.eval_modules),
        **({"autocast": g.autocast} if g.autocast else {}),
        **({"data_dependent_ops": list(g.data_dependent_ops)} if g.data_dependent_ops else {}),
        "profile": profile_to_dict(g.profile) if g.profile is not None else None,
    }


def encode(graphs: Graph | Sequence[Graph]) -> dict[str, Any]:
    """The upload document (a JSON-ready dict) for one traced step or several shapes of it."""
    gs = [graphs] if isinstance(graphs, Graph) else list(graphs)
    return {"format": FORMAT, "version": VERSION, "graphs": [graph_to_dict(g) for g in gs]}


def dumps(doc: Any) -> bytes:
    """Canonical JSON bytes: the same document, the same bytes (the cache hashes them)."""
    return json.dumps(doc, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()


def compress(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=6, mtime=0)


def decompress(data: bytes, *, limit: int) -> bytes:
    """gunzip at most ``limit`` bytes: a small upload that inflates past it raises ``TooLarge``."""
    d = zlib.decompressobj(wbits=31)
    try:
        out = d.decompress(data, limit + 1)
    except zlib.error as e:
        raise WireError(f"the body says Content-Encoding: gzip but is not gzip data ({e})") from None
    if len(out) > limit or d.unconsumed_tail:
        raise TooLarge(f"the body inflates to more than {limit:,} bytes, the server's limit")
    return out


class TooLarge(WireError):
    """The body (or what it inflates to) is over the server's size limit."""


# ---- decoding and validation ----------------------------------------------------------------------
class _Reader:
    """Typed access to one JSON value, with the path of every field for the error message."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, path: str, what: str) -> WireError:
        return WireError(f"{self.where}{path}: {what}")

    def int(self, v: Any, path: str, lo: int | None = None, hi: int | None = None, *, null: bool = False) -> Any:
        if v is None and null:
            return None
        if not isinstance(v, int) or isinstance(v, bool):
            raise self.fail(path, f"expected an integer{' or null' if null else ''}, got {_kind(v)}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise self.fail(path, f"{v} is out of range [{lo}, {hi}]")
        return v

    def str(self, v: Any, path: str, *, null: bool = False) -> Any:
        if v is None and null:
            return None
        if not isinstance(v, str):
            raise self.fail(path, f"expected a string, got {_kind(v)}")
        return v

    def list(self, v: Any, path: builtins.str, n: builtins.int | None = None) -> builtins.list:
        if not isinstance(v, list):
            raise self.fail(path, f"expected a list, got {_kind(v)}")
        if n is not None and len(v) != n:
            raise self.fail(path, f"expected {n} fields, got {len(v)}")
        return v

    def ints(self, v: Any, path: builtins.str, lo: builtins.int, hi: builtins.int) -> tuple[builtins.int, ...]:
        return tuple(self.int(x, f"{path}[{i}]", lo, hi) for i, x in enumerate(self.list(v, path)))


def _kind(v: Any) -> str:
    return "null" if v is None else type(v).__name__.replace("dict", "object").replace("list", "list")


def decode(doc: Any) -> list[Graph]:
    """The graphs of an upload document; ``WireError`` naming the first bad field."""
    if not isinstance(doc, dict):
        raise WireError(f"the graph document must be a JSON object, got {_kind(doc)}")
    if doc.get("format") != FORMAT:
        raise WireError(f"format must be {FORMAT!r}, got {doc.get('format')!r}")
    if doc.get("version") != VERSION:
        raise WireError(
            f"graph format version {doc.get('version')!r} is not supported (this ckptplan reads "
            f"version {VERSION}); use the same ckptplan version on client and server"
        )
    graphs = doc.get("graphs")
    if not isinstance(graphs, list) or not 1 <= len(graphs) <= MAX_GRAPHS:
        raise WireError(f"graphs must be a list of 1 to {MAX_GRAPHS} traced steps")
    return [graph_from_dict(g, where=f"graphs[{i}]") for i, g in enumerate(graphs)]


# the target a graph is planned for and the profile it is priced with; absent in older uploads
OPTIONAL_FIELDS = (
    "gpu",
    "gpu_capability",
    "traced_on",
    "sdpa_backends",
    "eval_modules",
    "autocast",
    "profile",
    "data_dependent_ops",
)
GRAPH_FIELDS = (
    "model_name",
    "signature",
    "num_parameters",
    "inputs",
    "device",
    "num_events",
    "module_tree",
    "tensor_names",
    "optimizer",
    "optimizer_state_bytes",
    "extra_fixed_bytes",
    "parallel",
    "torch_version",
    "saved_tensors",
    "fingerprint",
    "strings",
    "ops",
    "storages",
    "modules",
)
BIG = 2**62  # bytes, FLOPs and nanoseconds above this are not a real step's


def _target_fields(r: "_Reader", d: dict[str, Any]) -> dict[str, Any]:
    """The optional target and profile fields, checked."""
    out: dict[str, Any] = {}
    if d.get("gpu") is not None:
        out["gpu"] = r.str(d["gpu"], ".gpu")
    if d.get("gpu_capability") is not None:
        out["gpu_capability"] = r.ints(d["gpu_capability"], ".gpu_capability", 0, 99)
        if len(out["gpu_capability"]) != 2:
            raise r.fail(".gpu_capability", "a compute capability is [major, minor]")
    if d.get("traced_on") is not None:
        out["traced_on"] = r.str(d["traced_on"], ".traced_on")
    if d.get("autocast"):
        out["autocast"] = r.str(d["autocast"], ".autocast")
        if out["autocast"] not in ("bfloat16", "float16"):
            raise r.fail(".autocast", "autocast is bfloat16, float16 or empty")
    for name in ("sdpa_backends", "eval_modules"):
        if d.get(name) is not None:
            out[name] = tuple(r.str(x, f".{name}[{i}]") for i, x in enumerate(r.list(d[name], f".{name}")))
    if d.get("profile") is not None:
        try:
            out["profile"] = profile_from_dict(d["profile"], source=f"{r.where}.profile")
        except ValueError as e:
            raise WireError(str(e)) from None
    return out


def graph_from_dict(d: Any, *, where: str = "graph") -> Graph:
    r = _Reader(where)
    if not isinstance(d, dict):
        raise r.fail("", f"expected an object, got {_kind(d)}")
    missing = [k for k in GRAPH_FIELDS if k not in d]
    if missing:
        raise r.fail("", f"missing fields {missing}")
    unknown = sorted(set(d) - set(GRAPH_FIELDS) - set(OPTIONAL_FIELDS))
    if unknown:
        raise r.fail("", f"unknown fields {unknown}")
    strings = tuple(r.str(x, f".strings[{i}]") for i, x in enumerate(r.list(d["strings"], ".strings")))

    def string(v: Any, path: str) -> str:
        return strings[r.int(v, path, 0, len(strings) - 1)]

    raw_ops, raw_st = r.list(d["ops"], ".ops"), r.list(d["storages"], ".storages")
    raw_mod = r.list(d["modules"], ".modules")
    n_ops, n_st = len(raw_ops), len(raw_st)
    n_ev = r.int(d["num_events"], ".num_events", n_ops, BIG)
    sid = n_st - 1  # storage ids are row numbers
    kinds = {k.value: k for k in StorageKind}

    storages = []
    for i, row in enumerate(raw_st):
        p = f".storages[{i}]"
        row = r.list(row, p, 10)
        kind = kinds.get(row[1]) if isinstance(row[1], str) else None
        if kind is None:
            raise r.fail(f"{p}[1]", f"storage kind must be one of {sorted(kinds)}, got {row[1]!r}")
        storages.append(
            StorageInfo(
                id=i,
                nbytes=r.int(row[0], f"{p}[0]", 0, BIG),
                kind=kind,
                alloc_event=r.int(row[2], f"{p}[2]", -1, n_ev),
                free_event=r.int(row[3], f"{p}[3]", 0, n_ev),
                producer=r.int(row[4], f"{p}[4]", 0, n_ops - 1, null=True),
                saved_by=tuple(string(x, f"{p}[5][{j}]") for j, x in enumerate(r.list(row[5], f"{p}[5]"))),
                python_free_op=r.int(row[6], f"{p}[6]", -1, BIG),
                first_pack_event=r.int(row[7], f"{p}[7]", -1, BIG, null=True),
                last_pack_event=r.int(row[8], f"{p}[8]", -1, BIG, null=True),
                first_unpack_event=r.int(row[9], f"{p}[9]", -1, n_ev, null=True),
            )
        )

    ops = []
    for i, row in enumerate(raw_ops):
        p = f".ops[{i}]"
        row = r.list(row, p)
        if len(row) not in (11, 12):
            raise r.fail(p, f"an op row has 11 or 12 fields, got {len(row)}")
        outs = []
        for j, t in enumerate(r.list(row[2], f"{p}[2]")):
            q = f"{p}[2][{j}]"
            t = r.list(t, q, 4)
            outs.append(
                TensorInfo(
                    storage=r.int(t[0], f"{q}[0]", 0, sid),
                    shape=r.ints(t[1], f"{q}[1]", 0, BIG),
                    dtype=string(t[2], f"{q}[2]"),
                    nbytes=r.int(t[3], f"{q}[3]", 0, BIG),
                )
            )
        ops.append(
            OpNode(
                index=i,
                name=string(row[0], f"{p}[0]"),
                module=string(row[1], f"{p}[1]"),
                outputs=tuple(outs),
                inputs=r.ints(row[3], f"{p}[3]", 0, sid),
                allocates=r.ints(row[4], f"{p}[4]", 0, sid),
                mutates=r.ints(row[5], f"{p}[5]", 0, sid),
                flops=r.int(row[6], f"{p}[6]", 0, BIG),
                bytes_moved=r.int(row[7], f"{p}[7]", 0, BIG),
                cost_ns=r.int(row[8], f"{p}[8]", 0, BIG),
                random=bool(r.int(row[9], f"{p}[9]", 0, 1)),
                view=bool(r.int(row[10], f"{p}[10]", 0, 1)),
                cost_flops=r.int(row[11], f"{p}[11]", 0, BIG) if len(row) == 12 else None,
            )
        )

    modules = []
    for i, row in enumerate(raw_mod):
        p = f".modules[{i}]"
        row = r.list(row, p, 9)
        first = r.int(row[3], f"{p}[3]", 0, n_ops)
        end = r.int(row[4], f"{p}[4]", first, n_ops)
        modules.append(
            ModuleCall(
                path=string(row[0], f"{p}[0]"),
                type_name=string(row[1], f"{p}[1]"),
                call_index=r.int(row[2], f"{p}[2]", 0, BIG),
                first_op=first,
                end_op=end,
                input_storages=r.ints(row[5], f"{p}[5]", 0, sid),
                recompute_end_op=r.int(row[6], f"{p}[6]", first, end),
                first_unpack_event=r.int(row[7], f"{p}[7]", 0, n_ev, null=True),
                last_unpack_event=r.int(row[8], f"{p}[8]", 0, n_ev, null=True),
            )
        )

    tree = []
    for i, pair in enumerate(r.list(d["module_tree"], ".module_tree")):
        pair = r.list(pair, f".module_tree[{i}]", 2)
        tree.append((string(pair[0], f".module_tree[{i}][0]"), string(pair[1], f".module_tree[{i}][1]")))
    names = []
    for i, pair in enumerate(r.list(d["tensor_names"], ".tensor_names")):
        pair = r.list(pair, f".tensor_names[{i}]", 2)
        names.append((r.int(pair[0], f".tensor_names[{i}][0]", 0, sid), r.str(pair[1], f".tensor_names[{i}][1]")))
    try:
        g = Graph(
            model_name=r.str(d["model_name"], ".model_name"),
            signature=r.str(d["signature"], ".signature"),
            num_parameters=r.int(d["num_parameters"], ".num_parameters", 0, BIG),
            inputs=tuple(r.str(x, f".inputs[{i}]") for i, x in enumerate(r.list(d["inputs"], ".inputs"))),
            device=r.str(d["device"], ".device"),
            ops=tuple(ops),
            storages=tuple(storages),
            modules=tuple(modules),
            num_events=n_ev,
            module_tree=tuple(tree),
            tensor_names=tuple(names),
            optimizer=r.str(d["optimizer"], ".optimizer", null=True),
            optimizer_state_bytes=r.int(d["optimizer_state_bytes"], ".optimizer_state_bytes", 0, BIG),
            extra_fixed_bytes=r.int(d["extra_fixed_bytes"], ".extra_fixed_bytes", 0, BIG),
            parallel=r.str(d["parallel"], ".parallel"),
            torch_version=r.str(d["torch_version"], ".torch_version"),
            saved_tensors=r.int(d["saved_tensors"], ".saved_tensors", 0, BIG),
            data_dependent_ops=r.ints(d.get("data_dependent_ops") or [], ".data_dependent_ops", 0, n_ops - 1),
            **_target_fields(r, d),
        )
    except ValueError as e:  # Graph.__post_init__'s own checks
        raise r.fail("", str(e)) from None
    claimed = r.str(d["fingerprint"], ".fingerprint")
    if g.fingerprint != claimed:
        raise r.fail(
            ".fingerprint",
            f"the ops hash to {g.fingerprint}, not {claimed}: the graph was altered "
            "or written by another ckptplan version",
        )
    return g
