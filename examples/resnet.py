"""ResNet with BasicBlocks (He et al. 2015) that returns a classification loss.

Example model for ckptplan. A factory returns ``(model, args)`` such that
``model(*args)`` is a scalar cross-entropy loss. BatchNorm runs in train mode, so a
forward pass also updates its running statistics (an in-place buffer write that a
recompute would repeat).

Factories:
    resnet_tiny(device="cpu", ...)   CIFAR-style, 3 stages of 16/32/64 channels, for fast tests
    resnet18ish(device="meta", ...)  ResNet-18 layout and stem at 224x224, 11.7M params
    resnet50ish(device="meta", ...)  ResNet-50 layout (bottleneck blocks) at 224x224, 25.6M params

The stages are ``layer1`` ... ``layer{len(blocks)}``; their blocks are ``layer1.0``, ``layer1.1``, ...
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass(frozen=True)
class ResNetConfig:
    blocks: tuple[int, ...] = (2, 2, 2)  # BasicBlocks per stage
    widths: tuple[int, ...] = (16, 32, 64)  # output channels per stage
    num_classes: int = 10
    in_channels: int = 3
    imagenet_stem: bool = False  # False: 3x3 stride-1 conv (CIFAR); True: 7x7/2 conv + 3x3/2 max-pool
    bottleneck: bool = False  # Bottleneck blocks (1x1, 3x3, 1x1 at 4x the width) instead of BasicBlocks

    def __post_init__(self):
        if len(self.blocks) != len(self.widths) or not self.blocks:
            raise ValueError(
                f"blocks={self.blocks} and widths={self.widths} must be non-empty "
                "and of the same length (one entry per stage)"
            )
        if any(n < 1 for n in self.blocks):
            raise ValueError(f"blocks={self.blocks}: every stage needs at least one block")


def conv3x3(c_in, c_out, stride=1):
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


def shortcut(c_in, c_out, stride):
    """The residual path: the input itself, or projected (1x1 conv + BatchNorm) when the block changes
    resolution or width."""
    if stride == 1 and c_in == c_out:
        return nn.Sequential()
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(c_out),
    )


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = shortcut(c_in, c_out, stride)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))  # (N, c_out, H/s, W/s)
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return self.relu(out)


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck: the stride sits on the 3x3 convolution."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int = 1):
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = nn.Conv2d(c_in, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = shortcut(c_in, c_out, stride)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))  # (N, width, H, W)
        out = self.relu(self.bn2(self.conv2(out)))  # (N, width, H/s, W/s)
        out = self.bn3(self.conv3(out))  # (N, 4 width, H/s, W/s)
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, config: ResNetConfig):
        super().__init__()
        self.config = config
        c0 = config.widths[0]
        if config.imagenet_stem:
            self.stem = nn.Sequential(
                nn.Conv2d(config.in_channels, c0, kernel_size=7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(c0),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            )
        else:
            self.stem = nn.Sequential(conv3x3(config.in_channels, c0), nn.BatchNorm2d(c0), nn.ReLU(inplace=True))
        c_in = c0
        block = Bottleneck if config.bottleneck else BasicBlock
        grow = Bottleneck.expansion if config.bottleneck else 1
        for i, (n, width) in enumerate(zip(config.blocks, config.widths)):
            stride = 1 if i == 0 else 2  # every stage after the first halves H and W
            c_out = width * grow
            stage = [block(c_in, width, stride)] + [block(c_out, width) for _ in range(n - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            c_in = c_out
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, config.num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @property
    def stages(self):
        return [getattr(self, f"layer{i + 1}") for i in range(len(self.config.blocks))]

    def forward(self, x, targets):
        """x: (N, C, H, W) float images; targets: (N,) class ids. Returns the mean loss."""
        x = self.stem(x)  # (N, widths[0], H, W), or H/4 x W/4 with the ImageNet stem
        for stage in self.stages:
            x = stage(x)  # (N, width, H', W')
        x = torch.flatten(self.avgpool(x), 1)  # (N, widths[-1])
        logits = self.fc(x)  # (N, num_classes)
        return F.cross_entropy(logits, targets)


def _image_batch(batch_size, image_size, in_channels, num_classes, device, seed):
    """(images (N, C, H, W) float, labels (N,) long); drawn on CPU from their own generator."""
    if torch.device(device).type == "meta":
        x = torch.empty(batch_size, in_channels, image_size, image_size, device="meta")
        y = torch.empty(batch_size, dtype=torch.long, device="meta")
        return x, y
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, in_channels, image_size, image_size, generator=g)
    y = torch.randint(0, num_classes, (batch_size,), generator=g)
    return x.to(device), y.to(device)


def build(config: ResNetConfig, *, device="cpu", seed=0, batch_size=8, image_size=32):
    """Build the model on ``device`` (meta: no memory) with a seeded init, plus a batch."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = ResNet(config)
    model.train()
    batch = _image_batch(batch_size, image_size, config.in_channels, config.num_classes, device, seed)
    return model, batch


def resnet_tiny(
    device: str = "cpu",
    seed: int = 0,
    batch_size: int = 8,
    image_size: int = 32,
    blocks: tuple[int, ...] = (2, 2, 2),
    widths: tuple[int, ...] = (16, 32, 64),
    num_classes: int = 10,
):
    """CIFAR-style ResNet (ResNet-14 with the defaults) on 32x32 images."""
    config = ResNetConfig(blocks=tuple(blocks), widths=tuple(widths), num_classes=num_classes)
    return build(config, device=device, seed=seed, batch_size=batch_size, image_size=image_size)


def resnet18ish(
    device: str = "meta", seed: int = 0, batch_size: int = 64, image_size: int = 224, num_classes: int = 1000
):
    """ResNet-18 layout (2,2,2,2 blocks of 64/128/256/512) with the ImageNet stem; with 1000
    classes it has torchvision resnet18's 11,689,512 parameters."""
    config = ResNetConfig(blocks=(2, 2, 2, 2), widths=(64, 128, 256, 512), num_classes=num_classes, imagenet_stem=True)
    return build(config, device=device, seed=seed, batch_size=batch_size, image_size=image_size)


def resnet50ish(
    device: str = "meta",
    seed: int = 0,
    batch_size: int = 64,
    image_size: int = 224,
    num_classes: int = 1000,
    dtype: torch.dtype = torch.float32,
):
    """ResNet-50 layout (3,4,6,3 bottleneck blocks of width 64/128/256/512) with the ImageNet stem; with
    1000 classes it has torchvision resnet50's 25,557,032 parameters."""
    config = ResNetConfig(
        blocks=(3, 4, 6, 3), widths=(64, 128, 256, 512), num_classes=num_classes, imagenet_stem=True, bottleneck=True
    )
    model, (x, y) = build(config, device=device, seed=seed, batch_size=batch_size, image_size=image_size)
    if dtype != torch.float32:
        model.to(dtype=dtype)
        x = x.to(dtype)
    return model, (x, y)
