"""The torch internals ckptplan relies on, checked in one place when ckptplan is imported.

ckptplan supports torch >= 2.11, < 3 (``SUPPORTED``). It uses private torch names (dispatch modes,
selective checkpointing's cache wrapper, MemTracker, the FLOP formulas), which move between releases.
``check_torch`` looks each one up by feature, not by version, and raises ``UnsupportedTorch`` naming
every one that is missing, so an incompatible torch fails at ``import ckptplan`` with the list, never
halfway through a training step. Where releases spell a feature differently, this module picks the
spelling and the other modules import it from here. docs/torch-compat.md lists what was checked on
which release; tests/test_compat.py keeps ``REQUIRED`` and the modules' private imports in step.
"""

from __future__ import annotations

import importlib
import inspect
import re
import warnings
from typing import Any

import torch

from .errors import CkptplanError

SUPPORTED = ">=2.11,<3"  # the range pyproject.toml declares
_OLDEST = (2, 11)
_NEXT_MAJOR = 3


class UnsupportedTorch(CkptplanError, ImportError):
    """The installed torch lacks an internal that ckptplan needs (raised when ckptplan is imported, so
    the CLI exits with Python's status 1 and this message last)."""


# (module, attribute path, parameters its callable must take): everything ckptplan/ imports or calls
# from torch that is private, or public but younger than the oldest supported release. "core" is checked
# when ckptplan is imported; "measure" when ckptplan.measure is (torch.distributed takes seconds to import).
REQUIRED: dict[str, tuple[tuple[str, str, tuple[str, ...]], ...]] = {
    "core": (
        ("torch.utils._python_dispatch", "TorchDispatchMode", ()),
        ("torch.utils._python_dispatch", "_disable_current_modes", ()),
        ("torch.utils._pytree", "tree_flatten", ()),
        ("torch.utils._pytree", "tree_unflatten", ()),
        ("torch.utils._pytree", "tree_map", ()),
        ("torch.utils._pytree", "tree_leaves", ()),
        ("torch.utils.checkpoint", "checkpoint", ("use_reentrant", "context_fn")),
        ("torch.utils.checkpoint", "SAC_IGNORED_OPS", ()),
        ("torch.utils.checkpoint", "_VersionWrapper.get_val", ("allow_cache_entry_mutation",)),
        ("torch.utils.weak", "WeakIdKeyDictionary", ()),
        ("torch.utils.flop_counter", "flop_registry", ()),
        ("torch.utils.flop_counter", "sdpa_flop_count", ("query_shape", "key_shape", "value_shape")),
        ("torch._subclasses.fake_tensor", "FakeTensor", ()),
        ("torch.autograd.graph", "saved_tensors_hooks", ("pack_hook", "unpack_hook")),
        ("torch.autograd.graph", "register_multi_grad_hook", ("tensors", "fn", "mode")),
        ("torch.autograd", "Variable._execution_engine.queue_callback", ()),
        ("torch.compiler", "is_compiling", ()),
        ("torch", "Tag.nondeterministic_seeded", ()),
        ("torch", "ops.aten._scaled_dot_product_flash_attention_for_cpu.default", ()),
        # what the dispatch modes read off each op (any OpOverload; aten.add.Tensor stands for them)
        ("torch", "ops.aten.add.Tensor._schema.arguments", ()),
        ("torch", "ops.aten.add.Tensor._overloadpacket", ()),
        ("torch", "ops.aten.add.Tensor._opname", ()),
        ("torch", "ops.aten.add.Tensor.tags", ()),
    ),
    "measure": (
        ("torch.distributed._tools.mem_tracker", "MemTracker.track_external", ()),
        ("torch.distributed._tools.mem_tracker", "MemTracker.get_tracker_snapshot", ("type",)),
        ("torch.utils.flop_counter", "FlopCounterMode", ("display",)),
        ("torch.utils.flop_counter", "FlopCounterMode.get_total_flops", ()),
        ("torch._dynamo.eval_frame", "OptimizedModule", ()),
    ),
}


def _lookup(module: str, path: str) -> Any:
    obj: Any = importlib.import_module(module)
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _problem(module: str, path: str, params: tuple[str, ...]) -> str | None:
    """What is wrong with one requirement, or None."""
    try:
        obj = _lookup(module, path)
    except (ImportError, AttributeError):
        return f"{module}.{path} is missing"
    if params:
        try:
            have = inspect.signature(obj).parameters
        except (TypeError, ValueError):  # a builtin without a signature: its presence is the check
            return None
        lacking = [p for p in params if p not in have]
        if lacking:
            return f"{module}.{path} takes no {', '.join(lacking)}"
    return None


def _detach_function() -> Any:
    """Selective checkpointing's detach of a cached op output, as this torch spells it.

    torch >= 2.13 calls it ``_detach_helper(x)`` and detaches every tensor; 2.11 and 2.12 call it
    ``_maybe_detach(x, any_ret_has_alias_info)`` and detach every tensor when the flag is true.
    """
    from torch.utils import checkpoint

    helper = getattr(checkpoint, "_detach_helper", None)
    if helper is not None:
        return helper
    maybe = getattr(checkpoint, "_maybe_detach", None)
    if maybe is not None:
        return lambda x: maybe(x, True)
    return None


def torch_version() -> tuple[int, int]:
    """(major, minor) of the installed torch (``2.11.0+cu130`` -> (2, 11))."""
    m = re.match(r"(\d+)\.(\d+)", torch.__version__)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def check_torch(group: str = "core") -> None:
    """Raise UnsupportedTorch naming every internal of ``group`` this torch lacks; for "core", also warn
    on a release outside SUPPORTED."""
    problems = [p for p in (_problem(*r) for r in REQUIRED[group]) if p]
    if group == "core" and _detach_function() is None:
        problems.append("torch.utils.checkpoint has neither _detach_helper (2.13+) nor _maybe_detach (2.11, 2.12)")
    if problems:
        raise UnsupportedTorch(
            f"ckptplan needs torch{SUPPORTED}; this torch {torch.__version__} lacks what it uses: "
            + "; ".join(problems)
            + f". Install a supported release, e.g. pip install 'torch{SUPPORTED}' "
            "(docs/torch-compat.md lists the releases checked)"
        )
    version = torch_version()
    if group == "core" and not _OLDEST <= version < (_NEXT_MAJOR, 0):
        warnings.warn(
            f"ckptplan is tested on torch{SUPPORTED}, not {torch.__version__}: every internal it "
            "uses is present, but plans and the runtime are untested here",
            stacklevel=3,
        )


def _sdpa_counts_grouped_query() -> bool:
    """Whether torch's attention FLOP formulas accept fewer key/value heads than query heads.

    torch >= 2.12 counts grouped-query attention as if key and value were repeated to the query's
    heads; 2.11's formulas raise AssertionError on such shapes (ckptplan.flops repeats them itself).
    """
    from torch.utils.flop_counter import sdpa_flop_count

    try:
        sdpa_flop_count((1, 2, 1, 1), (1, 1, 1, 1), (1, 1, 1, 1))
    except AssertionError:
        return False
    return True


check_torch()

detach_cached = _detach_function()  # x -> x detached for selective checkpointing's cache (see above)
SDPA_COUNTS_GQA = _sdpa_counts_grouped_query()
