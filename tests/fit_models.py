"""A tiny residual stack whose activations grow with batch_size and seq_len, for tests/test_fit.py."""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))  # (B, T, width)


class Stack(nn.Module):
    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def stack(batch_size: int = 2, seq_len: int = 64, width: int = 32, depth: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    return Stack(width, depth), (torch.randn(batch_size, seq_len, width),)
