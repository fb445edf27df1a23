"""A small U-Net (Ronneberger et al. 2015) that returns a per-pixel segmentation loss.

Example model for ckptplan. Not a chain: each encoder level's output is kept alive
until the decoder concatenates it back in, so the activation graph is U-shaped.
A factory returns ``(model, args)`` such that ``model(*args)`` is a scalar loss.

Factory:
    unet_tiny(device="cpu", ...)  base 8 channels, 32x32 images, 3 classes

Modules, top to bottom: ``enc1`` (full resolution), ``enc2``, ``enc3``, ``bottleneck``
(each halving H and W with a max-pool first), then ``up3``, ``up2``, ``up1`` and ``head``.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 3
    num_classes: int = 3
    base: int = 8  # channels at full resolution; doubled at each level down

    def __post_init__(self):
        if self.base < 1 or self.num_classes < 2:
            raise ValueError(f"base={self.base} must be >= 1 and num_classes={self.num_classes} >= 2")


class DoubleConv(nn.Module):
    """(conv3x3 -> BN -> ReLU) x 2, keeping H and W."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )

    def forward(self, x):
        return self.net(x)


class Down(nn.Module):
    """Max-pool to half resolution, then DoubleConv."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.pool = nn.MaxPool2d(2)
        self.conv = DoubleConv(c_in, c_out)

    def forward(self, x):
        return self.conv(self.pool(x))  # (N, c_in, H, W) -> (N, c_out, H/2, W/2)


class Up(nn.Module):
    """Transposed conv to double resolution, concatenate the skip tensor, then DoubleConv."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(c_in, c_out, kernel_size=2, stride=2)
        self.conv = DoubleConv(2 * c_out, c_out)

    def forward(self, x, skip):
        x = self.up(x)  # (N, c_out, 2H, 2W)
        x = torch.cat([skip, x], dim=1)  # (N, 2*c_out, 2H, 2W)
        return self.conv(x)  # (N, c_out, 2H, 2W)


class UNet(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        b = config.base
        self.enc1 = DoubleConv(config.in_channels, b)  # H
        self.enc2 = Down(b, 2 * b)  # H/2
        self.enc3 = Down(2 * b, 4 * b)  # H/4
        self.bottleneck = Down(4 * b, 8 * b)  # H/8
        self.up3 = Up(8 * b, 4 * b)  # H/4, with enc3's output
        self.up2 = Up(4 * b, 2 * b)  # H/2, with enc2's output
        self.up1 = Up(2 * b, b)  # H,   with enc1's output
        self.head = nn.Conv2d(b, config.num_classes, kernel_size=1)

    def forward(self, x, targets):
        """x: (N, C, H, W) float, H and W divisible by 8; targets: (N, H, W) class ids.
        Returns the mean per-pixel cross-entropy loss (scalar)."""
        if x.size(-1) % 8 or x.size(-2) % 8:
            raise ValueError(f"image size {tuple(x.shape[-2:])} must be divisible by 8 (3 poolings)")
        s1 = self.enc1(x)  # (N, b, H, W)
        s2 = self.enc2(s1)  # (N, 2b, H/2, W/2)
        s3 = self.enc3(s2)  # (N, 4b, H/4, W/4)
        x = self.bottleneck(s3)  # (N, 8b, H/8, W/8)
        x = self.up3(x, s3)  # (N, 4b, H/4, W/4)
        x = self.up2(x, s2)  # (N, 2b, H/2, W/2)
        x = self.up1(x, s1)  # (N, b, H, W)
        logits = self.head(x)  # (N, num_classes, H, W)
        return F.cross_entropy(logits, targets)


def _segmentation_batch(batch_size, image_size, in_channels, num_classes, device, seed):
    """(images (N, C, H, W) float, masks (N, H, W) long); drawn on CPU from their own generator."""
    if torch.device(device).type == "meta":
        x = torch.empty(batch_size, in_channels, image_size, image_size, device="meta")
        y = torch.empty(batch_size, image_size, image_size, dtype=torch.long, device="meta")
        return x, y
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, in_channels, image_size, image_size, generator=g)
    y = torch.randint(0, num_classes, (batch_size, image_size, image_size), generator=g)
    return x.to(device), y.to(device)


def unet_tiny(
    device: str = "cpu", seed: int = 0, batch_size: int = 2, image_size: int = 32, base: int = 8, num_classes: int = 3
):
    """U-Net with 3 levels down and up, ``base`` channels at full resolution."""
    if image_size % 8:
        raise ValueError(f"image_size={image_size} must be divisible by 8 (3 poolings)")
    config = UNetConfig(num_classes=num_classes, base=base)
    torch.manual_seed(seed)
    with torch.device(device):
        model = UNet(config)
    model.train()
    batch = _segmentation_batch(batch_size, image_size, config.in_channels, num_classes, device, seed)
    return model, batch
