"""Linear layers for CPU inference: weight-only quantization, and lamina's C++ bf16 GEMM.

Decoding a small model is bound by how many weight bytes each token reads.
- int8: one scale per output channel (half of bf16's bytes).
- int4: asymmetric, one scale and minimum per group of 32 input channels (a quarter of bf16's
  bytes, plus the scales). This is the grid of llama.cpp's Q4_1, so the default model, shipped as
  Q4_1, is reproduced almost exactly (its blocks' min and max land back on the same grid). The
  lm_head stays int8.
- bf16 weights on CPU keep their bytes but are packed once for lamina's GEMM (`use_cpu_gemm`),
  which beats torch's matmul at every row count on a 2-core Zen 4 (`python bench/gemv.py`).
On CPU, few rows (decode) of int8 layers go to lamina's C++ GEMV; int4 layers use torch's packed
int4 kernel, which lamina's own int4 kernel did not beat. Many rows (prefill) dequantize the weight
and run one bf16 matmul, from row counts measured on a 2-core Zen 4. Without the C++ kernels (no
compiler, not on CPU) the layers fall back to torch's ops.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from lamina.kernels import cpu

log = logging.getLogger("lamina.quant")

INT4_GROUP_SIZE = 32
# Row counts where the GEMV kernels stop paying: from there dequantize + one bf16 matmul is faster
# (2-core Zen 4, a 576 x 3072 layer: `python bench/gemv.py`)
INT8_DEQUANT_MIN_ROWS = 16
INT4_DEQUANT_MIN_ROWS = 256


def _rows(x: torch.Tensor, in_features: int) -> int:
    return x.numel() // in_features


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        self.register_buffer("weight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        # float32: what the C++ kernel reads (torch's takes it in x's dtype)
        self.register_buffer("scale", scale.to(linear.weight.dtype).float())
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.use_gemv = cpu.usable(self.weight)
        self.use_torch_gemv = self.weight.device.type == "cpu" and hasattr(torch, "_weight_int8pack_mm")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        few_rows = _rows(x, self.in_features) < INT8_DEQUANT_MIN_ROWS
        flat = x.reshape(-1, self.in_features)
        if few_rows and self.use_gemv:
            y = torch.ops.lamina.int8_linear(flat, self.weight, self.scale).reshape(*x.shape[:-1], self.out_features)
        elif few_rows and self.use_torch_gemv:
            y = torch._weight_int8pack_mm(flat, self.weight, self.scale.to(x.dtype)).reshape(*x.shape[:-1], self.out_features)
        else:
            y = nn.functional.linear(x, self.weight.to(x.dtype) * self.scale[:, None].to(x.dtype))
        return y if self.bias is None else y + self.bias


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] -> codes [N, K] in 0..15 (uint8), scale and minimum [N, K/group] (float32), with
    w ~= codes * scale + minimum."""
    n, k = w.shape
    groups = w.float().view(n, k // group_size, group_size)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-10)
    codes = torch.round((groups - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    return codes.view(n, k), scale, lo


class Int4Linear(nn.Module):
    def __init__(self, linear: nn.Linear, group_size: int = INT4_GROUP_SIZE):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.group_size = group_size
        self.bias = linear.bias
        dtype = linear.weight.dtype
        codes, scale, lo = quantize_int4(linear.weight.detach(), group_size)
        # torch's CPU kernel takes bf16 activations and a multiple of 16 output channels (dequantize
        # reads its layout for multiples of 64)
        self.use_packed = (linear.weight.device.type == "cpu" and dtype == torch.bfloat16
                           and self.out_features % 16 == 0)
        if self.use_packed:
            # torch's kernel computes (code - 8) * scale + zero, from [K/group, N, 2] scale|zero pairs
            zero = lo + 8 * scale
            self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1))
            self.register_buffer("scale_zero", torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(dtype))
        else:
            # two codes per byte; dequantized per call
            self.register_buffer("weight", codes[:, ::2] | (codes[:, 1::2] << 4))
            self.register_buffer("scale", scale.to(dtype))
            self.register_buffer("minimum", lo.to(dtype))

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        if self.use_packed:
            # torch's CPU layout: blocks of 64 output channels; per input channel 32 bytes, whose
            # low nibbles are channels 0-31 of the block and high nibbles channels 32-63
            p = self.weight.view(n // 64, k, 32)
            codes = torch.cat([p & 15, p >> 4], dim=2).transpose(1, 2).reshape(n, k // self.group_size, self.group_size)
            scale, zero = self.scale_zero.to(dtype).transpose(0, 1).unbind(-1)   # [N, K/group] each
            w = (codes.to(dtype) - 8) * scale[..., None] + zero[..., None]
        else:
            codes = torch.stack([self.weight & 15, self.weight >> 4], -1).view(n, -1, self.group_size)
            w = codes.to(dtype) * self.scale[..., None].to(dtype) + self.minimum[..., None].to(dtype)
        return w.view(n, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_packed and (x.numel() < INT4_DEQUANT_MIN_ROWS * self.in_features or self.out_features % 64):
            flat = x.reshape(-1, self.in_features)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.weight, self.group_size, self.scale_zero)
            y = y.reshape(*x.shape[:-1], self.out_features)
        else:
            y = nn.functional.linear(x, self.dequantize(x.dtype))
        return y if self.bias is None else y + self.bias


def pack_bf16(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [N/16, K/2, 16, 2]: what torch.ops.lamina.bf16_packed_linear reads (one 64-byte
    load = 2 input channels of 16 output channels, VDPBF16PS's operand)."""
    n, k = weight.shape
    return weight.detach().view(n // 16, 16, k // 2, 2).permute(0, 2, 1, 3).contiguous()


class Bf16Linear(nn.Module):
    """A bf16 nn.Linear on CPU through lamina's C++ GEMM, for every row count: its weight is
    packed once here, where torch's matmul repacks it on every call. The nn.Linear's weight is not
    kept (a tied lm_head's packed copy is the only extra memory: the embedding keeps its own)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.register_buffer("packed", pack_bf16(linear.weight))
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    @staticmethod
    def fits(linear: nn.Linear) -> bool:
        return (linear.weight.dtype == torch.bfloat16 and linear.out_features % 16 == 0
                and linear.in_features % 2 == 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.lamina.bf16_packed_linear(x.reshape(-1, self.in_features).to(torch.bfloat16), self.packed)
        y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias


def use_cpu_gemm(model: nn.Module) -> bool:
    """Route a bf16 CPU model's matmuls to lamina's C++ GEMM. False (nothing changed) where the
    kernels are unavailable."""
    linears = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear and Bf16Linear.fits(m)]
    if not linears or not cpu.usable(linears[0][1].weight):
        return False
    for name, linear in linears:
        _replace(model, name, Bf16Linear(linear))
    return True


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


METHODS = {"int8": Int8Linear, "int4": Int4Linear}


def quantize_model(model: nn.Module, method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown quantization {method!r}; lamina supports {', '.join(METHODS)}")
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, linear in targets:
        kind = method
        if method == "int4" and name == "lm_head":
            # the output projection is the most sensitive matrix (llama.cpp's 4-bit files keep it
            # at 6-8 bits too; the default model's is Q8_0): int8 keeps perplexity within 2 %
            kind = "int8"
        elif method == "int4" and linear.in_features % INT4_GROUP_SIZE:
            log.warning("%s: %d input features are not a multiple of %d; left unquantized",
                        name, linear.in_features, INT4_GROUP_SIZE)
            continue
        _replace(model, name, METHODS[kind](linear))
