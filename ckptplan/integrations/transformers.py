"""Hugging Face ``transformers``: a planned replacement for ``model.gradient_checkpointing_enable()``.

    handle = apply_to_pretrained(model, budget="20GB", batch_size=8, seq_len=2048)   # your own loop
    trainer = Trainer(model, args, callbacks=[CkptplanCallback(budget="20GB")], ...)  # a Trainer

Both trace one training step in train mode, solve for the budget and apply the plan (``ckptplan.auto``),
with ``use_cache`` off while the plan is applied (a recomputed layer would append to the KV cache again).

Known limitations: the plan holds for the input shape it was made for (the runtime refuses another one,
naming it): use batches of one shape (``dataloader_drop_last=True``, padding to a fixed length).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..auto import auto
from ..errors import InputError
from ..runtime import Handle

try:
    import transformers
    from transformers import TrainerCallback
except ImportError as e:  # an optional dependency: say how to get it
    raise ImportError(
        "ckptplan.integrations.transformers needs Hugging Face transformers: pip install transformers"
    ) from e


def _device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _token_batch(model: nn.Module, batch_size: Any, seq_len: Any) -> dict[str, torch.Tensor]:
    """input_ids and labels (B, T) of random token ids, as a causal-LM training batch passes them."""
    for name, v in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InputError(
                f"{name} must be a positive int, got {v!r}; or pass example_inputs= (a batch as "
                "your loop passes it to the model)"
            )
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 1:
        raise InputError(
            "the model's config has no vocab_size to draw example token ids from; pass "
            "example_inputs= (a batch as your loop passes it to the model)"
        )
    g = torch.Generator().manual_seed(0)  # the global RNG stays as the training script left it
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g).to(_device(model))
    return {"input_ids": ids, "labels": ids}


def _check_model(model: Any) -> None:
    if not isinstance(model, transformers.PreTrainedModel):
        raise InputError(
            f"expected a transformers PreTrainedModel, got {type(model).__name__}; "
            "for another model use ckptplan.auto(model, *example_args, budget=...)"
        )
    # transformers 5 names it is_activation_checkpointing (the older name warns); 4.x only the older one
    name = (
        "is_activation_checkpointing"
        if hasattr(type(model), "is_activation_checkpointing")
        else "is_gradient_checkpointing"
    )
    if getattr(model, name, False):
        raise InputError(
            "the model already runs Hugging Face's gradient checkpointing; call "
            "model.gradient_checkpointing_disable() first (activation_checkpointing_disable() in "
            "transformers 5; ckptplan replaces it)"
        )


def _plan(model: nn.Module, budget: int | str, batch: dict[str, Any], optimizer: Any, time_limit_s: float) -> Handle:
    """Trace (in train mode, restored after), solve and apply for the keyword batch ``batch``."""
    _check_model(model)
    if not isinstance(batch, dict):
        raise InputError(
            f"example_inputs must be a dict of keyword arguments (a batch as your loop passes it "
            f"to model(**batch)), got {type(batch).__name__}"
        )
    device = _device(model)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    was_training = model.training
    model.train()  # plan the training step (from_pretrained returns a model in eval mode)
    try:
        return auto(model, budget=budget, optimizer=optimizer, time_limit_s=time_limit_s, **batch)
    finally:
        model.train(was_training)


def apply_to_pretrained(
    model: nn.Module,
    *,
    budget: int | str,
    example_inputs: dict[str, Any] | None = None,
    batch_size: int | None = None,
    seq_len: int | None = None,
    optimizer: Any = None,
    time_limit_s: float = 30.0,
) -> Handle:
    """Plan and apply checkpointing for a ``PreTrainedModel`` under ``budget``, in place of
    ``model.gradient_checkpointing_enable()``; ``handle.remove()`` undoes it.

    ``example_inputs``: one batch as the training loop passes it, ``model(**example_inputs)``; without it,
    ``input_ids`` and ``labels`` of shape (``batch_size``, ``seq_len``). ``optimizer``: a ``torch.optim``
    optimizer or its name ("adamw"), whose state the budget then includes.
    """
    _check_model(model)
    batch = example_inputs if example_inputs is not None else _token_batch(model, batch_size, seq_len)
    return _plan(model, budget, batch, optimizer, time_limit_s)


class CkptplanCallback(TrainerCallback):
    """Plans and applies checkpointing when a ``Trainer`` starts training; removes it when training ends.

        trainer = Trainer(model, args, train_dataset=ds, callbacks=[CkptplanCallback(budget="20GB")])

    The plan is made for the Trainer's first batch (drawn with the RNG state restored, so the data order
    is unchanged) as the Trainer passes it to the model, including ``num_items_in_batch`` where the model
    takes loss keyword arguments; or, given ``batch_size`` and ``seq_len``, for ``input_ids`` and
    ``labels`` of that shape. The budget includes the Trainer's optimizer state (``optimizer="adamw"``
    names it where the Trainer's optimizer is one ckptplan does not know). Do not also set
    ``gradient_checkpointing=True`` in the TrainingArguments.
    """

    def __init__(
        self,
        budget: int | str,
        *,
        batch_size: int | None = None,
        seq_len: int | None = None,
        optimizer: Any = None,
        time_limit_s: float = 30.0,
    ) -> None:
        if (batch_size is None) != (seq_len is None):
            raise InputError("give both batch_size and seq_len, or neither (then the first batch is used)")
        self.budget, self.batch_size, self.seq_len = budget, batch_size, seq_len
        self.optimizer, self.time_limit_s = optimizer, time_limit_s
        self.handle: Handle | None = None

    def _first_batch(self, model: nn.Module, dataloader: Any) -> dict[str, Any]:
        if self.batch_size is not None:
            return _token_batch(model, self.batch_size, self.seq_len)
        if dataloader is None:
            raise InputError(
                "the Trainer gave no train_dataloader to plan from; pass batch_size= and seq_len= to CkptplanCallback"
            )
        with torch.random.fork_rng(devices=[]):  # a shuffling sampler draws its seed from the global RNG
            batch = dict(next(iter(dataloader)))
        if _accepts_loss_kwargs(model) and isinstance(batch.get("labels"), torch.Tensor):
            # the Trainer's compute_loss passes it too; only its shape (a scalar) matters to the plan
            batch["num_items_in_batch"] = batch["labels"].ne(-100).sum()
        return batch

    def on_train_begin(
        self,
        args: Any,
        state: Any,
        control: Any,
        model: nn.Module | None = None,
        train_dataloader: Any = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        if model is None:
            raise InputError("the Trainer passed no model to CkptplanCallback.on_train_begin")
        if getattr(args, "gradient_checkpointing", False):
            raise InputError(
                "TrainingArguments(gradient_checkpointing=True) turns on Hugging Face's "
                "checkpointing; set it False when using CkptplanCallback (ckptplan replaces it)"
            )
        _check_model(model)
        batch = self._first_batch(model, train_dataloader)
        self.handle = _plan(model, self.budget, batch, self.optimizer or optimizer, self.time_limit_s)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def _accepts_loss_kwargs(model: nn.Module) -> bool:
    """Whether the Trainer passes ``num_items_in_batch`` to ``model.forward`` (its own test)."""
    import inspect

    if hasattr(model, "accepts_loss_kwargs"):
        return bool(model.accepts_loss_kwargs)
    params = inspect.signature(model.forward).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


__all__ = ["CkptplanCallback", "apply_to_pretrained"]
