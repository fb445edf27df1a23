"""What ``apply`` checks before touching a model: its parameters, buffers and module types."""

from __future__ import annotations

import hashlib
import json

from torch import nn


def signature_items(model: nn.Module) -> list[list[str]]:
    items = [["param", n, str(list(p.shape)), str(p.dtype).removeprefix("torch.")] for n, p in model.named_parameters()]
    items += [["buffer", n, str(list(b.shape)), str(b.dtype).removeprefix("torch.")] for n, b in model.named_buffers()]
    items += [["module", n, type(m).__name__] for n, m in model.named_modules()]
    return items


def model_signature(model: nn.Module) -> str:
    """Hash of parameter/buffer names, shapes and dtypes and of module types and paths."""
    return hashlib.sha256(json.dumps(signature_items(model)).encode()).hexdigest()[:16]


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
