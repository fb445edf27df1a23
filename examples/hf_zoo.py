"""Tiny Hugging Face ``transformers`` architectures and PyTorch's own transformer modules, one factory each.

The real-models suite (tests/test_real_models.py, benchmarks/real_models.py) runs ckptplan on models
nobody here wrote. ``ZOO[name]()`` returns ``(model, args, kwargs)`` built on CPU from a tiny config with
a seeded random init, in train mode, such that ``default_loss(model(*args, **kwargs))`` is the step's
loss (``out.loss`` for every Hugging Face model, a mean of squares for the PyTorch modules). Nothing is downloaded;
``transformers`` is imported inside the factories.

Every decoder config sets ``use_cache=False`` (see examples/hf_models.py: a recomputed layer would append
to the cache again). Mixture-of-experts models run their eager expert loops
(``experts_implementation="eager"``), whose token counts per expert depend on the routing.

Known limitations: on transformers releases other than 5.x a config field may be named differently.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from hf_models import hf_gpt2_tiny, hf_llama_tiny

Built = tuple[nn.Module, tuple, dict]

SEQ = 64  # tokens per sequence of the text models
BATCH = 4
VOCAB = 512


def _ids(seed: int, batch: int = BATCH, seq: int = SEQ, vocab: int = VOCAB) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=g)  # ids 0-2: pad, bos, eos


def _floats(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _images(seed: int, size: int = 32) -> dict:
    return {"pixel_values": _floats(seed, BATCH, 3, size, size), "labels": torch.arange(BATCH) % 10}


def _build(model_cls: type, config: Any, kwargs: dict, seed: int) -> Built:
    torch.manual_seed(seed)
    model = model_cls(config)
    model.train()
    return model, (), kwargs


def _causal(model_cls: type, config: Any, seed: int) -> Built:
    """A causal LM: labels are the input ids (the model shifts them)."""
    ids = _ids(seed)
    return _build(model_cls, config, {"input_ids": ids, "labels": ids}, seed)


_DECODER = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=VOCAB,
    max_position_embeddings=SEQ,
    use_cache=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def llama(seed: int = 0) -> Built:
    return hf_llama_tiny(seed=seed, batch_size=BATCH, seq_len=SEQ, n_layer=2)


def gpt2(seed: int = 0) -> Built:
    return hf_gpt2_tiny(seed=seed, batch_size=BATCH, seq_len=SEQ, n_layer=2)


def mistral(seed: int = 0) -> Built:
    from transformers import MistralConfig, MistralForCausalLM

    return _causal(MistralForCausalLM, MistralConfig(**_DECODER, sliding_window=32), seed)


def qwen2(seed: int = 0) -> Built:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _causal(Qwen2ForCausalLM, Qwen2Config(**_DECODER), seed)


def gemma2(seed: int = 0) -> Built:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(**_DECODER, head_dim=16, sliding_window=32, attn_implementation="eager")
    return _causal(Gemma2ForCausalLM, config, seed)


def gpt_neox(seed: int = 0) -> Built:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=VOCAB,
        max_position_embeddings=SEQ,
        use_cache=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    return _causal(GPTNeoXForCausalLM, config, seed)


def opt(seed: int = 0) -> Built:
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=128,
        word_embed_proj_dim=64,
        vocab_size=VOCAB,
        max_position_embeddings=SEQ,
        use_cache=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return _causal(OPTForCausalLM, config, seed)


def _encoder_config(config_cls: type) -> Any:
    return config_cls(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=VOCAB,
        max_position_embeddings=SEQ + 2,
        pad_token_id=0,
    )


def bert(seed: int = 0) -> Built:
    from transformers import BertConfig, BertForMaskedLM

    ids = _ids(seed)
    return _build(BertForMaskedLM, _encoder_config(BertConfig), {"input_ids": ids, "labels": ids}, seed)


def roberta(seed: int = 0) -> Built:
    from transformers import RobertaConfig, RobertaForMaskedLM

    ids = _ids(seed)
    return _build(RobertaForMaskedLM, _encoder_config(RobertaConfig), {"input_ids": ids, "labels": ids}, seed)


def t5(seed: int = 0) -> Built:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        vocab_size=VOCAB,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=0,
    )
    ids = _ids(seed)
    return _build(T5ForConditionalGeneration, config, {"input_ids": ids, "labels": _ids(seed + 1)}, seed)


def bart(seed: int = 0) -> Built:
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        vocab_size=VOCAB,
        max_position_embeddings=SEQ,
        use_cache=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=None,
    )
    ids = _ids(seed)
    return _build(BartForConditionalGeneration, config, {"input_ids": ids, "labels": _ids(seed + 1)}, seed)


def vit(seed: int = 0) -> Built:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=32,
        patch_size=4,
        num_labels=10,
    )
    return _build(ViTForImageClassification, config, _images(seed), seed)


def swin(seed: int = 0) -> Built:
    from transformers import SwinConfig, SwinForImageClassification

    config = SwinConfig(
        image_size=32, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4, num_labels=10
    )
    return _build(SwinForImageClassification, config, _images(seed), seed)


def clip(seed: int = 0) -> Built:
    from transformers import CLIPConfig, CLIPModel

    text = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=VOCAB,
        max_position_embeddings=SEQ,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    vision = dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=4
    )
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)
    kwargs = {"input_ids": _ids(seed, seq=16), "pixel_values": _floats(seed, BATCH, 3, 32, 32), "return_loss": True}
    return _build(CLIPModel, config, kwargs, seed)


def whisper(seed: int = 0) -> Built:
    """Whisper's encoder position embedding is a frozen parameter (requires_grad=False)."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        vocab_size=VOCAB,
        num_mel_bins=16,
        max_source_positions=32,
        max_target_positions=SEQ,
        use_cache=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        suppress_tokens=None,
        begin_suppress_tokens=None,
    )
    kwargs = {"input_features": _floats(seed, BATCH, 16, 64), "labels": _ids(seed, seq=16)}
    return _build(WhisperForConditionalGeneration, config, kwargs, seed)


def mamba(seed: int = 0) -> Built:
    from transformers import MambaConfig, MambaForCausalLM

    config = MambaConfig(
        hidden_size=64,
        state_size=8,
        num_hidden_layers=2,
        vocab_size=VOCAB,
        use_cache=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return _causal(MambaForCausalLM, config, seed)


def mixtral(seed: int = 0) -> Built:
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(**_DECODER, num_local_experts=4, num_experts_per_tok=2, experts_implementation="eager")
    return _causal(MixtralForCausalLM, config, seed)


def qwen2_moe(seed: int = 0) -> Built:
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    config = Qwen2MoeConfig(
        **_DECODER,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=128,
        experts_implementation="eager",
    )
    return _causal(Qwen2MoeForCausalLM, config, seed)


def resnet(seed: int = 0) -> Built:
    """Convolutional: bottleneck blocks, BatchNorm (its statistics are buffers the step updates)."""
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32], depths=[2, 2], layer_type="bottleneck", num_labels=10
    )
    return _build(ResNetForImageClassification, config, _images(seed), seed)


def convnext(seed: int = 0) -> Built:
    """Convolutional: depthwise 7x7 convolutions, LayerNorm over channels, layer scale."""
    from transformers import ConvNextConfig, ConvNextForImageClassification

    config = ConvNextConfig(
        hidden_sizes=[16, 32], depths=[2, 2], num_stages=2, image_size=32, patch_size=2, num_labels=10
    )
    return _build(ConvNextForImageClassification, config, _images(seed), seed)


class EncoderClassifier(nn.Module):
    """PyTorch's stock ``nn.TransformerEncoder`` (batch_first) over a (B, T, d) input; loss: mean of squares."""

    def __init__(self, d: int = 128, layers: int = 2) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, nhead=4, dim_feedforward=2 * d, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x).pow(2).mean()


def torch_encoder(seed: int = 0) -> Built:
    torch.manual_seed(seed)
    model = EncoderClassifier().train()
    return model, (_floats(seed, BATCH, SEQ, 128),), {}


class DecoderLM(nn.Module):
    """PyTorch's stock ``nn.TransformerDecoder`` (batch_first, causal self-attention, cross-attention to a
    memory) over (B, T, d) targets; loss: mean of squares."""

    def __init__(self, d: int = 64, layers: int = 2) -> None:
        super().__init__()
        layer = nn.TransformerDecoderLayer(d, nhead=4, dim_feedforward=2 * d, batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, layers)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        return self.decoder(tgt, memory, tgt_mask=mask, tgt_is_causal=True).pow(2).mean()


def torch_decoder(seed: int = 0) -> Built:
    torch.manual_seed(seed)
    model = DecoderLM().train()
    return model, (_floats(seed, BATCH, SEQ, 64), _floats(seed + 1, BATCH, SEQ // 2, 64)), {}


class AttentionStack(nn.Module):
    """Stock ``nn.MultiheadAttention`` layers (batch_first, dropout) with residuals; loss: mean of squares."""

    def __init__(self, d: int = 64, layers: int = 3) -> None:
        super().__init__()
        self.attn = nn.ModuleList(nn.MultiheadAttention(d, 4, dropout=0.1, batch_first=True) for _ in range(layers))
        self.norm = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, norm in zip(self.attn, self.norm):
            h = norm(x)
            x = x + attn(h, h, h, need_weights=False)[0]
        return x.pow(2).mean()


def torch_mha(seed: int = 0) -> Built:
    torch.manual_seed(seed)
    model = AttentionStack().train()
    return model, (_floats(seed, BATCH, SEQ, 64),), {}


# name -> factory; decoder, encoder, encoder-decoder, vision, multimodal, state-space, mixture-of-experts
ZOO: dict[str, Callable[[], Built]] = {
    "llama": llama,
    "mistral": mistral,
    "qwen2": qwen2,
    "gemma2": gemma2,
    "gpt2": gpt2,
    "gpt_neox": gpt_neox,
    "opt": opt,
    "bert": bert,
    "roberta": roberta,
    "t5": t5,
    "bart": bart,
    "vit": vit,
    "swin": swin,
    "clip": clip,
    "whisper": whisper,
    "mamba": mamba,
    "mixtral": mixtral,
    "qwen2_moe": qwen2_moe,
    "resnet": resnet,
    "convnext": convnext,
    "torch_encoder": torch_encoder,
    "torch_decoder": torch_decoder,
    "torch_mha": torch_mha,
}
