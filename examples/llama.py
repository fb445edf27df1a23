"""Llama-style decoder (RMSNorm, rotary embeddings, grouped-query attention, SwiGLU) with a loss.

Example model for ckptplan. A factory returns ``(model, args)`` such that
``model(*args)`` is a scalar cross-entropy loss. No dropout anywhere, so a step is
deterministic on CPU.

Factories:
    llama_tiny(device="cpu", ...)  128 wide, 4 heads sharing 2 kv heads, for fast tests
    llama_1b(device="meta", ...)   Llama-3.2-1B-like, grouped-query attention in SDPA, 1.10B parameters
    llama_7b(device="meta", ...)   Llama-1/2 7B shape, 6.74B parameters

The repeated blocks are ``layers.0`` ... ``layers.{n_layer-1}``.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass(frozen=True)
class LlamaConfig:
    dim: int = 4096
    n_layer: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32  # < n_heads gives grouped-query attention
    vocab_size: int = 32000
    hidden_dim: int = 11008  # SwiGLU inner width
    max_seq_len: int = 4096  # length of the precomputed rotary tables
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    sdpa_gqa: bool = False  # hand grouped-query attention to SDPA (enable_gqa) instead of repeating k, v

    def __post_init__(self):
        if self.dim % self.n_heads != 0:
            raise ValueError(f"dim={self.dim} must be divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if (self.dim // self.n_heads) % 2 != 0:
            raise ValueError(f"head dim {self.dim // self.n_heads} must be even for rotary embeddings")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise by the root mean square over the last dim; no mean subtraction, no bias
        rms = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)  # (..., 1)
        return x * rms * self.weight


def rotary_tables(head_dim: int, max_seq_len: int, theta: float):
    """cos, sin: (max_seq_len, head_dim), laid out for rotate_half (both halves repeat)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    t = torch.arange(max_seq_len, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (max_seq_len, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (max_seq_len, head_dim)
    return emb.cos(), emb.sin()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x, cos, sin):
    """x: (B, nh, T, hd); cos, sin: (T, hd)."""
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.dim // config.n_heads
        self.sdpa_gqa = config.sdpa_gqa
        self.wq = nn.Linear(config.dim, config.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * self.head_dim, config.dim, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.size()
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # Grouped-query attention: each kv head serves n_heads // n_kv_heads query heads.
        # We expand k, v with repeat_interleave rather than SDPA's enable_gqa=True. Both give
        # identical results on CPU and on meta in torch 2.13, but enable_gqa is only honoured
        # by some SDPA backends (CPU flash and math; on CUDA not the memory-efficient kernel),
        # while the explicit repeat runs on every backend and shows the expanded k, v as
        # ordinary activations that a checkpointing planner can see and account for.
        n_rep = self.n_heads // self.n_kv_heads
        if self.sdpa_gqa:  # CUDA's flash and cuDNN kernels read each kv head for its group of q heads
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=n_rep > 1)  # (B, nh, T, hd)
            return self.wo(y.transpose(1, 2).contiguous().view(B, T, -1))
        if n_rep > 1:
            k = k.repeat_interleave(n_rep, dim=1)  # (B, nh, T, hd)
            v = v.repeat_interleave(n_rep, dim=1)  # (B, nh, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)  # (B, T, dim)
        return self.wo(y)


class FeedForward(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.hidden_dim, bias=False)  # gate
        self.w3 = nn.Linear(config.dim, config.hidden_dim, bias=False)  # up
        self.w2 = nn.Linear(config.hidden_dim, config.dim, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # SwiGLU: (B, T, hidden) -> (B, T, dim)


class TransformerBlock(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x, cos, sin):
        x = x + self.attention(self.attention_norm(x), cos, sin)
        x = x + self.feed_forward(self.ffn_norm(x))
        return x


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList([TransformerBlock(config) for _ in range(config.n_layer)])
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)  # not tied
        cos, sin = rotary_tables(config.dim // config.n_heads, config.max_seq_len, config.rope_theta)
        # derived from the config, so not part of the state dict
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, tokens, targets):
        """tokens, targets: (B, T) integer ids. Returns the mean cross-entropy loss (scalar)."""
        B, T = tokens.size()
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.config.max_seq_len}")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, hd)
        x = self.tok_embeddings(tokens)  # (B, T, dim)
        for layer in self.layers:
            x = layer(x, cos, sin)
        logits = self.output(self.norm(x))  # (B, T, vocab_size)
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1))


def _token_batch(batch_size, seq_len, vocab_size, device, seed):
    """(tokens, targets), each (B, T) long; drawn on CPU from their own generator; empty on meta."""
    if torch.device(device).type == "meta":
        tokens = torch.empty(batch_size, seq_len, dtype=torch.long, device="meta")
        targets = torch.empty(batch_size, seq_len, dtype=torch.long, device="meta")
        return tokens, targets
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (batch_size, seq_len), generator=g)
    targets = torch.randint(0, vocab_size, (batch_size, seq_len), generator=g)
    return tokens.to(device), targets.to(device)


def build(config: LlamaConfig, *, device="cpu", seed=0, batch_size=1, seq_len=None, dtype=torch.float32):
    """Build the model on ``device`` (meta: no memory) with a seeded init, plus a batch.
    ``dtype`` casts parameters and the rotary tables after the float32 init."""
    seq_len = config.max_seq_len if seq_len is None else seq_len
    torch.manual_seed(seed)
    with torch.device(device):
        model = Llama(config)
    if dtype != torch.float32:  # a no-op cast still swaps tensors, which FakeTensorMode refuses
        model.to(dtype=dtype)
    model.train()
    return model, _token_batch(batch_size, seq_len, config.vocab_size, device, seed)


def llama_tiny(
    device: str = "cpu",
    seed: int = 0,
    batch_size: int = 2,
    seq_len: int = 64,
    n_layer: int = 4,
    dtype: torch.dtype = torch.float32,
):
    """A Llama-shaped toy: 128 wide, 4 heads over 2 kv heads, SwiGLU 344, vocab 512."""
    config = LlamaConfig(
        dim=128, n_layer=n_layer, n_heads=4, n_kv_heads=2, vocab_size=512, hidden_dim=344, max_seq_len=max(seq_len, 64)
    )
    return build(config, device=device, seed=seed, batch_size=batch_size, seq_len=seq_len, dtype=dtype)


def llama_1b(
    device: str = "meta",
    seed: int = 0,
    batch_size: int = 1,
    seq_len: int = 4096,
    n_layer: int = 16,
    dtype: torch.dtype = torch.float32,
):
    """A Llama-3.2-1B-like shape: 2048 wide, 32 heads over 8 kv heads handed to SDPA (enable_gqa), SwiGLU
    8192, vocab 32000, untied output; 1.10B parameters with 16 layers."""
    config = LlamaConfig(
        dim=2048,
        n_layer=n_layer,
        n_heads=32,
        n_kv_heads=8,
        vocab_size=32000,
        hidden_dim=8192,
        max_seq_len=max(seq_len, 4096),
        sdpa_gqa=True,
    )
    return build(config, device=device, seed=seed, batch_size=batch_size, seq_len=seq_len, dtype=dtype)


def llama_7b(
    device: str = "meta",
    seed: int = 0,
    batch_size: int = 1,
    seq_len: int = 4096,
    n_layer: int = 32,
    dtype: torch.dtype = torch.float32,
    max_seq_len: int | None = None,
):
    """Llama 7B shape: 4096 wide, 32 heads (no GQA), SwiGLU 11008, vocab 32000; 6.74B params.
    ``max_seq_len`` (default: max(seq_len, 4096)) fixes the rotary tables across sequence lengths."""
    config = LlamaConfig(
        dim=4096,
        n_layer=n_layer,
        n_heads=32,
        n_kv_heads=32,
        vocab_size=32000,
        hidden_dim=11008,
        max_seq_len=max_seq_len or max(seq_len, 4096),
    )
    return build(config, device=device, seed=seed, batch_size=batch_size, seq_len=seq_len, dtype=dtype)
