"""What aten ops do that their schemas do not say, shared by the tracer and the runtime."""

from __future__ import annotations

from typing import Any

import torch

aten = torch.ops.aten

# Ops that write arguments their schema does not mark as written: {op: (positions, training flag position)}.
HIDDEN_WRITES = {
    aten.native_batch_norm.default: ((3, 4), 5),
    aten.cudnn_batch_norm.default: ((3, 4), 5),
    aten.miopen_batch_norm.default: ((3, 4), 5),
}

# Indexing whose output shape follows its index tensors' shapes, unless an index is a boolean mask.
_INDEXING = frozenset({aten.index.Tensor, aten._unsafe_index.Tensor})


def data_dependent(func: Any, args: tuple) -> bool:  # func: an aten OpOverload
    """Whether the output shape of ``func`` depends on tensor values (``nonzero``, ``masked_select``,
    ``unique``, boolean-mask indexing): torch's ``dynamic_output_shape`` tag, less integer indexing."""
    if torch.Tag.dynamic_output_shape not in func.tags:
        return False
    if func in _INDEXING:
        indices = args[1] if len(args) > 1 else ()
        return any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in indices)
    return True
