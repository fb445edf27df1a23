"""Vision Transformer (Dosovitskiy et al. 2020), written in the style of nanoGPT, with a loss.

Example model for ckptplan. A factory returns ``(model, args)`` such that
``model(*args)`` is a scalar cross-entropy loss, so one training step is
``model(*args).backward()``.

Factories:
    vit_tiny(device="cpu", ...)   32x32 images in 4x4 patches, 96 wide, 4 blocks, for fast tests
    vit_base(device="meta", ...)  ViT-B/16 shape at 224x224, 86.6M parameters

The repeated blocks are ``blocks.0`` ... ``blocks.{n_layer-1}``.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 224
    patch_size: int = 16
    in_channels: int = 3
    num_classes: int = 1000
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    mlp_ratio: int = 4  # MLP inner width is mlp_ratio * n_embd
    dropout: float = 0.0
    bias: bool = True  # bias in Linears and LayerNorms, as in ViT

    def __post_init__(self):
        if self.image_size % self.patch_size != 0:
            raise ValueError(f"image_size={self.image_size} must be divisible by patch_size={self.patch_size}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class SelfAttention(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        # key, query, value projections for all heads, in one batch
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x):
        B, T, C = x.size()  # batch, tokens (patches + class token), embedding dim (n_embd)
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # each (B, T, C)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        # every token sees every other: no causal mask in an encoder
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=False, dropout_p=self.dropout if self.training else 0.0
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads: (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.mlp_ratio * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()  # exact (erf) GELU, as in ViT
        self.c_proj = nn.Linear(config.mlp_ratio * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        x = self.gelu(self.c_fc(x))  # (B, T, mlp_ratio * C)
        return self.dropout(self.c_proj(x))  # (B, T, C)


class Block(nn.Module):
    """Pre-norm encoder block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = SelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class ViT(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        # a patch_size-strided convolution is a Linear applied to each non-overlapping patch
        self.patch_embed = nn.Conv2d(
            config.in_channels, config.n_embd, kernel_size=config.patch_size, stride=config.patch_size, bias=True
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.n_embd))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + 1, config.n_embd))
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.head = nn.Linear(config.n_embd, config.num_classes, bias=True)

        self.apply(self._init_weights)
        torch.nn.init.normal_(self.cls_token, mean=0.0, std=0.02)
        torch.nn.init.normal_(self.pos_embed, mean=0.0, std=0.02)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)

    def forward(self, images, labels):
        """images: (B, C, H, W) float; labels: (B,) class ids. Returns the mean cross-entropy loss."""
        B, _, H, W = images.size()
        if H != self.config.image_size or W != self.config.image_size:
            raise ValueError(
                f"images are {H}x{W}, the model was built for {self.config.image_size}x{self.config.image_size}"
            )
        x = self.patch_embed(images)  # (B, C, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (B, N, C), N = (H/p) * (W/p) patches
        cls = self.cls_token.expand(B, -1, -1)  # (B, 1, C)
        x = torch.cat((cls, x), dim=1) + self.pos_embed  # (B, N + 1, C)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        logits = self.head(x[:, 0])  # classify from the class token: (B, num_classes)
        return F.cross_entropy(logits, labels)


def _image_batch(batch_size, image_size, in_channels, num_classes, device, seed):
    """(images (B, C, H, W) float, labels (B,) long); drawn on CPU from their own generator so the
    data do not depend on the device or on how much RNG the model init used; empty on meta."""
    if torch.device(device).type == "meta":
        x = torch.empty(batch_size, in_channels, image_size, image_size, device="meta")
        y = torch.empty(batch_size, dtype=torch.long, device="meta")
        return x, y
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, in_channels, image_size, image_size, generator=g)
    y = torch.randint(0, num_classes, (batch_size,), generator=g)
    return x.to(device), y.to(device)


def build(config: ViTConfig, *, device="cpu", seed=0, batch_size=8):
    """Build the model on ``device`` (meta: no memory) with a seeded init, plus a batch."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = ViT(config)
    model.train()
    batch = _image_batch(batch_size, config.image_size, config.in_channels, config.num_classes, device, seed)
    return model, batch


def vit_tiny(
    device: str = "cpu",
    seed: int = 0,
    batch_size: int = 16,
    image_size: int = 32,
    patch_size: int = 4,
    n_layer: int = 4,
    dropout: float = 0.0,
    num_classes: int = 10,
):
    """A ViT-shaped toy: 4x4 patches of 32x32 images (64 patches + class token), 96 wide,
    4 heads, MLP 384, 10 classes; 4 blocks have 458k parameters."""
    config = ViTConfig(
        image_size=image_size,
        patch_size=patch_size,
        num_classes=num_classes,
        n_layer=n_layer,
        n_head=4,
        n_embd=96,
        dropout=dropout,
    )
    return build(config, device=device, seed=seed, batch_size=batch_size)


def vit_base(
    device: str = "meta",
    seed: int = 0,
    batch_size: int = 64,
    image_size: int = 224,
    n_layer: int = 12,
    num_classes: int = 1000,
):
    """ViT-B/16: 16x16 patches of 224x224 images (196 patches + class token), 12 blocks,
    12 heads, 768 wide, MLP 3072; with 1000 classes 86,567,656 parameters (timm's vit_base_patch16_224)."""
    config = ViTConfig(
        image_size=image_size,
        patch_size=16,
        num_classes=num_classes,
        n_layer=n_layer,
        n_head=12,
        n_embd=768,
        dropout=0.0,
    )
    return build(config, device=device, seed=seed, batch_size=batch_size)
