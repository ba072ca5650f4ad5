"""Weight-only quantized linear layers: int8 and int4, each running the implementation the kernel
dispatch chose for its row count.

Decoding a small model is bound by how many weight bytes each token reads.
- int8: one scale per output channel (half of bf16's bytes).
- int4: asymmetric, one scale and minimum per group of 32 input channels (a quarter of bf16's
  bytes, plus the scales). This is the grid of llama.cpp's Q4_1, so the default model, shipped as
  Q4_1, is reproduced almost exactly (its blocks' min and max land back on the same grid). The
  lm_head stays int8.
Implementations (kernels/dispatch.py picks one per class of row counts, by measuring): "lamina",
lamina's VNNI kernels on a layout packed once at load (cpu_quant.cpp; on CPU, with blocks of 16
outputs and groups of 32 inputs); "torch", torch's int8 GEMV; "dequant", the weight rebuilt in bf16
for one torch matmul, which wins once a step has enough rows (prefill).
"""
from __future__ import annotations

import torch
from torch import nn

from lamina.kernels.dispatch import RowPlan
from lamina.layers.linear import PlannedLinear, _kernels

INT4_GROUP_SIZE = 32
QUANT_BLOCK = 16  # output channels per block of the packed int8/int4 layouts (cpu_quant.cpp)


@torch.library.custom_op("lamina_torch::weight_int8_mm", mutates_args=())
def _torch_int8_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """torch's int8 GEMV (x [M, K] @ weight [N, K]^T * scale [N]), as an opaque op: Inductor's own
    lowering of aten._weight_int8pack_mm fails on a bf16 x in torch 2.14 (its scale arrives as an
    unrealized cast: LoweringException), so a compiled step calls torch's kernel as it is."""
    return torch._weight_int8pack_mm(x, weight, scale.to(x.dtype))


@_torch_int8_mm.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def _packable(linear: nn.Linear, device: torch.device | None) -> bool:
    """Whether lamina's packed int8/int4 kernels take this layer: on CPU, blocks of 16 output
    channels and groups of 32 input channels."""
    return (linear.out_features % QUANT_BLOCK == 0 and linear.in_features % INT4_GROUP_SIZE == 0
            and _kernels(linear, device))


class Int8Linear(PlannedLinear):
    """`amax`: each output channel's largest |weight| over the whole row, where this layer holds only
    a slice of it (a row-parallel shard): its scales are then those of the unsharded layer."""
    op = "int8_linear"

    def __init__(self, linear: nn.Linear, plan: RowPlan | None = None, amax: torch.Tensor | None = None):
        super().__init__(linear, plan)
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) if amax is None else amax.float()).clamp(min=1e-8) / 127.0
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        if self.plan.uses("lamina"):
            self.register_buffer("packed", pack_int8(q))
        if self.plan.uses("torch") or self.plan.uses("dequant"):
            # dequantize reads this layout (unpacking the packed one on every call would cost more)
            self.register_buffer("weight", q)
        # float32: what the C++ kernel reads (torch's takes it in x's dtype)
        self.register_buffer("scale", scale.to(linear.weight.dtype).float())
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    @staticmethod
    def impls(linear: nn.Linear, device: torch.device | None = None) -> tuple[str, ...]:
        torch_gemv = (device or linear.weight.device).type == "cpu" and hasattr(torch, "_weight_int8pack_mm")
        return ("lamina",) * _packable(linear, device) + ("torch",) * torch_gemv + ("dequant",)

    def int8_weight(self) -> torch.Tensor:
        return self.weight if hasattr(self, "weight") else unpack_int8(self.packed)

    def run(self, impl: str, x: torch.Tensor) -> torch.Tensor:
        if impl == "lamina":
            return torch.ops.lamina.int8_packed_linear(x, self.packed, self.scale)
        if impl == "torch":
            return _torch_int8_mm(x, self.weight, self.scale)
        return nn.functional.linear(x, self.int8_weight().to(x.dtype) * self.scale[:, None].to(x.dtype))


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] -> codes [N, K] in 0..15 (uint8), scale and minimum [N, K/group] (float32), with
    w ~= codes * scale + minimum."""
    n, k = w.shape
    groups = w.float().view(n, k // group_size, group_size)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-10)
    codes = torch.round((groups - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    return codes.view(n, k), scale, lo


def pack_int4(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """codes [N, K] in 0..15, scale and minimum [N, K/32] -> uint8 [N/16, K/32, 320], what
    torch.ops.lamina.int4_packed_linear reads: per block of 16 output channels and group of 32
    input channels, four 64-byte vectors (vector j, lane c, byte b: low nibble code(c, 4j + b),
    high nibble code(c, 16 + 4j + b)), then lane c's bf16 scale (low half) and minimum (high half)."""
    n, k = codes.shape
    blocks, groups = n // QUANT_BLOCK, k // INT4_GROUP_SIZE
    # k = g*32 + half*16 + 4j + b  ->  [block, g, j, c, half, b]
    c = codes.to(torch.uint8).view(blocks, QUANT_BLOCK, groups, 2, 4, 4).permute(0, 2, 4, 1, 3, 5)
    nibbles = (c[..., 0, :] | (c[..., 1, :] << 4)).reshape(blocks, groups, 256)
    pairs = torch.stack([scale.to(torch.bfloat16), minimum.to(torch.bfloat16)], -1)       # [N, G, 2]
    pairs = pairs.view(blocks, QUANT_BLOCK, groups, 2).transpose(1, 2).contiguous()      # [block, g, c, 2]
    return torch.cat([nibbles, pairs.view(torch.uint8).view(blocks, groups, 64)], -1).contiguous()


def unpack_int4(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """pack_int4's inverse: (codes [N, K], scale [N, K/32], minimum [N, K/32]; bf16)."""
    blocks, groups, _ = packed.shape
    nibbles = packed[..., :256].reshape(blocks, groups, 4, QUANT_BLOCK, 4)                  # [block, g, j, c, b]
    c = torch.stack([nibbles & 15, nibbles >> 4], -2)                                      # [block, g, j, c, half, b]
    codes = c.permute(0, 3, 1, 4, 2, 5).reshape(blocks * QUANT_BLOCK, groups * INT4_GROUP_SIZE)
    pairs = packed[..., 256:].contiguous().view(torch.bfloat16).view(blocks, groups, QUANT_BLOCK, 2)
    scale, minimum = pairs.transpose(1, 2).reshape(blocks * QUANT_BLOCK, groups, 2).unbind(-1)
    return codes, scale, minimum


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] int8 -> uint8 [N/16, K/32, 512], what torch.ops.lamina.int8_packed_linear reads:
    per block of 16 output channels and group of 32 input channels, eight 64-byte vectors (vector j,
    lane c, byte b: q(c, 4j + b) + 128, unsigned for VPDPBUSD)."""
    n, k = q.shape
    u = (q.to(torch.int16) + 128).to(torch.uint8)
    return u.view(n // QUANT_BLOCK, QUANT_BLOCK, k // 32, 8, 4).permute(0, 2, 3, 1, 4).reshape(
        n // QUANT_BLOCK, k // 32, 512).contiguous()


def unpack_int8(packed: torch.Tensor) -> torch.Tensor:
    blocks, groups, _ = packed.shape
    u = packed.view(blocks, groups, 8, QUANT_BLOCK, 4).permute(0, 3, 1, 2, 4).reshape(blocks * QUANT_BLOCK, groups * 32)
    return (u.to(torch.int16) - 128).to(torch.int8)


class Int4Linear(PlannedLinear):
    op = "int4_linear"

    def __init__(self, linear: nn.Linear, plan: RowPlan | None = None, group_size: int = INT4_GROUP_SIZE):
        if group_size != INT4_GROUP_SIZE:   # lamina's kernel reads groups of 32 only
            plan = RowPlan("dequant", "dequant", "dequant")
        super().__init__(linear, plan)
        self.group_size = group_size
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = linear.bias
        codes, scale, lo = quantize_int4(linear.weight.detach(), group_size)
        if self.use_kernel:
            self.register_buffer("packed", pack_int4(codes, scale, lo))
        else:
            # two codes per byte; dequantized per call
            dtype = linear.weight.dtype
            self.register_buffer("weight", codes[:, ::2] | (codes[:, 1::2] << 4))
            self.register_buffer("scale", scale.to(dtype))
            self.register_buffer("minimum", lo.to(dtype))

    @staticmethod
    def impls(linear: nn.Linear, device: torch.device | None = None) -> tuple[str, ...]:
        return ("lamina",) * _packable(linear, device) + ("dequant",)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        if self.use_kernel:
            codes, scale, minimum = unpack_int4(self.packed)
            codes = codes.view(n, -1, self.group_size)
        else:
            codes = torch.stack([self.weight & 15, self.weight >> 4], -1).view(n, -1, self.group_size)
            scale, minimum = self.scale, self.minimum
        w = codes.to(dtype) * scale[..., None].to(dtype) + minimum[..., None].to(dtype)
        return w.view(n, k)

    def run(self, impl: str, x: torch.Tensor) -> torch.Tensor:
        if impl == "lamina":
            return torch.ops.lamina.int4_packed_linear(x, self.packed)
        return nn.functional.linear(x, self.dequantize(x.dtype))


METHODS = {"int8": Int8Linear, "int4": Int4Linear}
