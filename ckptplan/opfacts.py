"""What aten ops do that their schemas do not say, shared by the tracer and the runtime."""

from __future__ import annotations

import torch

aten = torch.ops.aten

# Ops that write arguments their schema does not mark as written: {op: (positions, training flag position)}.
HIDDEN_WRITES = {
    aten.native_batch_norm.default: ((3, 4), 5),
    aten.cudnn_batch_norm.default: ((3, 4), 5),
    aten.miopen_batch_norm.default: ((3, 4), 5),
}
