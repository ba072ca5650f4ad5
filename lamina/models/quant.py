"""Weight-only int8 quantization with one scale per output channel.

Decoding a small model is bound by how many weight bytes each token reads; int8 halves that
against bf16. Activations stay in the model dtype; each matmul dequantizes on the fly.
"""
from __future__ import annotations

import torch
from torch import nn


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        self.register_buffer("weight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # torch's packed int8 CPU kernel: reads int8 weights directly, no dequantized copy
        self.use_packed = self.weight.device.type == "cpu" and hasattr(torch, "_weight_int8pack_mm")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_packed:
            shape = x.shape
            y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]), self.weight, self.scale)
            y = y.reshape(*shape[:-1], self.out_features)
        else:
            y = nn.functional.linear(x, self.weight.to(x.dtype)) * self.scale
        return y if self.bias is None else y + self.bias


def quantize_model(model: nn.Module, method: str) -> None:
    if method != "int8":
        raise ValueError(f"unknown quantization {method!r}; lamina supports int8")
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear(linear))
