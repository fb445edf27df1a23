"""Hugging Face ``transformers`` models with random weights, built from a config (nothing downloaded).

Example models for ckptplan. A factory returns ``(model, args, kwargs)`` such that
``model(*args, **kwargs).loss`` is a scalar causal-LM cross-entropy loss (the labels are the input
ids; the model shifts them). ckptplan's default loss takes ``out.loss``, so these trace, solve and
apply like the hand-written examples. ``transformers`` is imported inside the factories, so importing
this file does not need it.

Factories:
    hf_llama_tiny(device="cpu", ...)  LlamaForCausalLM: 128 wide, 4 heads over 2 kv heads, SwiGLU 344
    hf_gpt2_tiny(device="cpu", ...)   GPT2LMHeadModel: 128 wide, 4 heads, dropout 0.1, tied embeddings

The repeated blocks are ``model.layers.0`` ... ``model.layers.{n_layer-1}`` (Llama) and
``transformer.h.0`` ... ``transformer.h.{n_layer-1}`` (GPT-2).

``use_cache=False`` in both configs is required, not cosmetic: with the default ``use_cache=True``
a training forward builds a ``DynamicCache`` and every decoder layer appends its keys and values to
it. When a checkpointed layer is recomputed in backward it appends to the same cache again, so the
recomputation sees longer keys than the forward did (the slice of the cache differs) and selective
checkpointing fails in backward with ``aten.slice.Tensor invocation index 4 encountered during
backward but not found in storage``.

On ``device="meta"`` the factories build the model, but its forward fails inside transformers' mask
code (a data-dependent ``.item()`` that it skips only for fake tensors). To trace a large HF model
without memory, build it on CPU inside ``torch._subclasses.fake_tensor.FakeTensorMode()`` instead.
"""

import torch


def _token_batch(batch_size, seq_len, vocab_size, device, seed):
    """input ids (B, T) long, drawn on CPU from their own generator; empty on meta."""
    if torch.device(device).type == "meta":
        return torch.empty(batch_size, seq_len, dtype=torch.long, device="meta")
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch_size, seq_len), generator=g).to(device)


def build(model_cls, config, *, device="cpu", seed=0, batch_size=4, seq_len=128):
    """Instantiate ``model_cls(config)`` on ``device`` (meta: no memory) with a seeded random init,
    in train mode, plus ``(input_ids,)`` and ``{"labels": input_ids}``."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_cls(config)
    # The loss is picked by the class name; "GPT2LMHeadModel" names none, which logs a warning
    # and falls back to this same causal-LM loss (a config field does not reach it: it is a
    # model attribute). Llama's class name already selects it.
    model.loss_type = "ForCausalLM"
    model.train()
    input_ids = _token_batch(batch_size, seq_len, config.vocab_size, device, seed)
    return model, (input_ids,), {"labels": input_ids}


def hf_llama_tiny(device: str = "cpu", seed: int = 0, batch_size: int = 4, seq_len: int = 128, n_layer: int = 4):
    """LlamaForCausalLM toy: 128 wide, 4 heads sharing 2 kv heads (grouped-query attention),
    SwiGLU 344, vocab 1024, SDPA attention, untied output; 988k parameters with 4 layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=128,
        num_hidden_layers=n_layer,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=344,
        vocab_size=1024,
        max_position_embeddings=max(seq_len, 128),
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="sdpa",
        # With use_cache=True (the default) every forward builds a DynamicCache that a recomputed
        # layer appends to again, so recomputation sees other key lengths than the forward and
        # selective checkpointing crashes in backward ("aten.slice.Tensor invocation index 4
        # encountered during backward but not found in storage"). Training needs no cache.
        use_cache=False,
    )
    return build(LlamaForCausalLM, config, device=device, seed=seed, batch_size=batch_size, seq_len=seq_len)


def hf_gpt2_tiny(
    device: str = "cpu", seed: int = 0, batch_size: int = 4, seq_len: int = 128, n_layer: int = 4, dropout: float = 0.1
):
    """GPT2LMHeadModel toy: 128 wide, 4 heads, MLP 512, vocab 1024, SDPA attention, dropout
    (embedding, attention, residual), tied embeddings; 941k parameters with 4 layers."""
    from transformers import GPT2Config, GPT2LMHeadModel

    vocab_size = 1024
    config = GPT2Config(
        n_embd=128,
        n_layer=n_layer,
        n_head=4,
        vocab_size=vocab_size,
        n_positions=max(seq_len, 128),
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        # GPT-2's default special token (50256) lies outside this vocab: use its last id instead
        bos_token_id=vocab_size - 1,
        eos_token_id=vocab_size - 1,
        attn_implementation="sdpa",
        # With use_cache=True (the default) every forward builds a DynamicCache that a recomputed
        # layer appends to again, so recomputation sees other key lengths than the forward and
        # selective checkpointing crashes in backward ("aten.slice.Tensor invocation index 4
        # encountered during backward but not found in storage"). Training needs no cache.
        use_cache=False,
    )
    return build(GPT2LMHeadModel, config, device=device, seed=seed, batch_size=batch_size, seq_len=seq_len)
