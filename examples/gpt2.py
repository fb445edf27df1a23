"""GPT-2 style decoder, written after nanoGPT, that returns a training loss.

Example model for ckptplan. A factory returns ``(model, args)`` such that
``model(*args)`` is a scalar cross-entropy loss, so one training step is
``model(*args).backward()``.

Factories:
    gpt2_small(device="meta", ...)  GPT-2 small shape (124M params), the CLI's bundled example
    gpt2_tiny(device="cpu", ...)    a few hundred thousand params, for fast tests

The repeated blocks are ``transformer.h.0`` ... ``transformer.h.{n_layer-1}``.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass(frozen=True)
class GPTConfig:
    block_size: int = 1024  # longest sequence the position embedding covers
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # bias in Linears and LayerNorms, as in GPT-2

    def __post_init__(self):
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        # key, query, value projections for all heads, in one batch
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x):
        B, T, C = x.size()  # batch, sequence length, embedding dim (n_embd)
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # each (B, T, C)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads: (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        x = self.gelu(self.c_fc(x))  # (B, T, 4C)
        return self.dropout(self.c_proj(x))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying: the output projection shares the token embedding matrix
        self.transformer.wte.weight = self.lm_head.weight

        self.apply(self._init_weights)
        # GPT-2 paper: scale the init of residual projections by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets):
        """idx, targets: (B, T) integer token ids. Returns the mean cross-entropy loss (scalar)."""
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)  # (T,)
        tok_emb = self.transformer.wte(idx)  # (B, T, C)
        pos_emb = self.transformer.wpe(pos)  # (T, C)
        x = self.transformer.drop(tok_emb + pos_emb)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)  # (B, T, vocab_size)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def _token_batch(batch_size, seq_len, vocab_size, device, seed):
    """(idx, targets), each (B, T) long. Drawn on CPU from their own generator so the data
    do not depend on the device or on how much RNG the model init used; empty on meta."""
    if torch.device(device).type == "meta":
        idx = torch.empty(batch_size, seq_len, dtype=torch.long, device="meta")
        targets = torch.empty(batch_size, seq_len, dtype=torch.long, device="meta")
        return idx, targets
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab_size, (batch_size, seq_len), generator=g)
    targets = torch.randint(0, vocab_size, (batch_size, seq_len), generator=g)
    return idx.to(device), targets.to(device)


def build(config: GPTConfig, *, device="cpu", seed=0, batch_size=8, seq_len=None):
    """Build the model on ``device`` (meta: no memory) with a seeded init, plus a batch."""
    seq_len = config.block_size if seq_len is None else seq_len
    torch.manual_seed(seed)
    with torch.device(device):
        model = GPT(config)
    model.train()
    return model, _token_batch(batch_size, seq_len, config.vocab_size, device, seed)


def gpt2_small(device: str = "meta", seed: int = 0, batch_size: int = 8, seq_len: int = 1024):
    """GPT-2 small: 12 layers, 12 heads, 768 wide, 124M parameters (tied embeddings)."""
    config = GPTConfig(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024, dropout=0.1, bias=True)
    return build(config, device=device, seed=seed, batch_size=batch_size, seq_len=seq_len)


def gpt2_xl(device: str = "meta", seed: int = 0, batch_size: int = 1, seq_len: int = 1024, n_layer: int = 48):
    """GPT-2 XL: 48 layers, 25 heads, 1600 wide, 1.56B parameters (tied embeddings)."""
    config = GPTConfig(
        n_layer=n_layer, n_head=25, n_embd=1600, vocab_size=50257, block_size=1024, dropout=0.1, bias=True
    )
    return build(config, device=device, seed=seed, batch_size=batch_size, seq_len=seq_len)


def gpt2_tiny(
    device: str = "cpu",
    seed: int = 0,
    batch_size: int = 2,
    seq_len: int = 64,
    n_layer: int = 4,
    dropout: float = 0.1,
    block_size: int | None = None,
):
    """A GPT-2 shaped toy: 128 wide, 4 heads, vocab 512; one step takes milliseconds on CPU.
    ``block_size`` (default: max(seq_len, 64)) fixes the model across several sequence lengths."""
    config = GPTConfig(
        n_layer=n_layer,
        n_head=4,
        n_embd=128,
        vocab_size=512,
        block_size=block_size or max(seq_len, 64),
        dropout=dropout,
        bias=True,
    )
    return build(config, device=device, seed=seed, batch_size=batch_size, seq_len=seq_len)
