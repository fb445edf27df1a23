"""The module state a training step runs in: which modules are in eval mode, Hugging Face's KV cache.

Shared by the tracer (what the traced step ran in) and the runtime (whether a step runs in it)."""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

from torch import nn

log = logging.getLogger("ckptplan")


def eval_modules(model: nn.Module) -> tuple[str, ...]:
    """Paths of the modules in eval mode (none in a plain training step)."""
    return tuple(path for path, m in model.named_modules() if not m.training)


def kv_cache_off(model: nn.Module) -> bool:
    """Turn Hugging Face's ``use_cache`` off for training, as its gradient checkpointing does (a KV cache is
    for generation, and a recomputed layer would append to it again); True if it was on."""
    config = getattr(model, "config", None)
    if not getattr(config, "use_cache", False) or not model.training:
        return False
    assert config is not None  # getattr(None, "use_cache", False) is False
    log.warning(
        "ckptplan: use_cache=True is incompatible with checkpointing a training step; "
        "setting model.config.use_cache = False while it runs (as Hugging Face's gradient "
        "checkpointing does)"
    )
    config.use_cache = False
    return True


def kv_cache_restore(model: nn.Module, was_on: bool) -> None:
    if was_on:
        config: Any = model.config  # Hugging Face's config, which nn.Module's __getattr__ types as a module
        config.use_cache = True


@contextlib.contextmanager
def no_kv_cache(model: nn.Module) -> Iterator[None]:
    """``use_cache`` off while the block runs (``kv_cache_off``)."""
    was_on = kv_cache_off(model)
    try:
        yield
    finally:
        kv_cache_restore(model, was_on)
