"""Activation layers, by the backend's ops."""
from __future__ import annotations

import torch
from torch import nn

from lamina.kernels import Ops


class SiluAndMul(nn.Module):
    """[T, 2I] -> silu(x[:, :I]) * x[:, I:], by the backend's op."""

    def __init__(self, ops: Ops):
        super().__init__()
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.silu_and_mul(x)
