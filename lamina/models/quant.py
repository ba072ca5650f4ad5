"""Linear layers for CPU inference: weight-only quantization, and lamina's C++ bf16 GEMM.

Decoding a small model is bound by how many weight bytes each token reads.
- int8: one scale per output channel (half of bf16's bytes).
- int4: asymmetric, one scale and minimum per group of 32 input channels (a quarter of bf16's
  bytes, plus the scales). This is the grid of llama.cpp's Q4_1, so the default model, shipped as
  Q4_1, is reproduced almost exactly (its blocks' min and max land back on the same grid). The
  lm_head stays int8.
- bf16 weights on CPU keep their bytes but are packed once for lamina's GEMM (`use_cpu_gemm`),
  which beats torch's matmul at every row count on a 2-core Zen 4 (`python bench/gemv.py`). An
  MLP's fused gate/up projection applies SwiGLU inside that GEMM (`Bf16SwiGLU`).
On CPU, int8 and int4 weights are packed once at load for lamina's VNNI kernels (cpu_quant.cpp),
which serve up to a few hundred rows (decode batches; at one row, weights out of cache, ~2x torch's
int8 kernel and 1.2-1.3x its int4 one); more rows (prefill) dequantize the weight and run one bf16
matmul. Without the C++ kernels (no compiler, not on CPU, shapes off the 16 x 32 grid) the layers
fall back to torch's ops.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from lamina.kernels import cpu

log = logging.getLogger("lamina.quant")

INT4_GROUP_SIZE = 32
QUANT_BLOCK = 16  # output channels per block of the packed int8/int4 layouts (cpu_quant.cpp)
# Row counts from which dequantize + one bf16 matmul beats lamina's packed kernels (2-core Zen 4, a
# 576 x 3072 layer: `python bench/gemv.py`)
INT8_DEQUANT_MIN_ROWS = 128
INT4_DEQUANT_MIN_ROWS = 256
# Without lamina's kernels, torch's int8 GEMV serves int8 layers below this many rows
TORCH_INT8_GEMV_MAX_ROWS = 16


@torch.library.custom_op("lamina_torch::weight_int8_mm", mutates_args=())
def _torch_int8_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """torch's int8 GEMV (x [M, K] @ weight [N, K]^T * scale [N]), as an opaque op: Inductor's own
    lowering of aten._weight_int8pack_mm fails on a bf16 x in torch 2.14 (its scale arrives as an
    unrealized cast: LoweringException), so a compiled step calls torch's kernel as it is."""
    return torch._weight_int8pack_mm(x, weight, scale.to(x.dtype))


@_torch_int8_mm.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def _rows(x: torch.Tensor, in_features: int) -> int:
    return x.numel() // in_features


def _packable(linear: nn.Linear) -> bool:
    """Whether lamina's packed int8/int4 kernels take this layer: on CPU, blocks of 16 output
    channels and groups of 32 input channels."""
    return (linear.out_features % QUANT_BLOCK == 0 and linear.in_features % INT4_GROUP_SIZE == 0
            and cpu.usable(linear.weight))


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.use_kernel = _packable(linear)
        if self.use_kernel:
            self.register_buffer("packed", pack_int8(q))
        else:
            self.register_buffer("weight", q)
        # float32: what the C++ kernel reads (torch's takes it in x's dtype)
        self.register_buffer("scale", scale.to(linear.weight.dtype).float())
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.use_torch_gemv = linear.weight.device.type == "cpu" and hasattr(torch, "_weight_int8pack_mm")

    def int8_weight(self) -> torch.Tensor:
        return unpack_int8(self.packed) if self.use_kernel else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows(x, self.in_features)
        flat = x.reshape(-1, self.in_features)
        if self.use_kernel and rows < INT8_DEQUANT_MIN_ROWS:
            y = torch.ops.lamina.int8_packed_linear(flat, self.packed, self.scale).reshape(*x.shape[:-1], self.out_features)
        elif not self.use_kernel and self.use_torch_gemv and rows < TORCH_INT8_GEMV_MAX_ROWS:
            y = _torch_int8_mm(flat, self.weight, self.scale).reshape(*x.shape[:-1], self.out_features)
        else:
            y = nn.functional.linear(x, self.int8_weight().to(x.dtype) * self.scale[:, None].to(x.dtype))
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


class Int4Linear(nn.Module):
    def __init__(self, linear: nn.Linear, group_size: int = INT4_GROUP_SIZE):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.group_size = group_size
        self.bias = linear.bias
        codes, scale, lo = quantize_int4(linear.weight.detach(), group_size)
        self.use_kernel = group_size == INT4_GROUP_SIZE and _packable(linear)
        if self.use_kernel:
            self.register_buffer("packed", pack_int4(codes, scale, lo))
        else:
            # two codes per byte; dequantized per call
            dtype = linear.weight.dtype
            self.register_buffer("weight", codes[:, ::2] | (codes[:, 1::2] << 4))
            self.register_buffer("scale", scale.to(dtype))
            self.register_buffer("minimum", lo.to(dtype))

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_kernel and _rows(x, self.in_features) < INT4_DEQUANT_MIN_ROWS:
            y = torch.ops.lamina.int4_packed_linear(x.reshape(-1, self.in_features), self.packed)
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


def pack_bf16_swiglu(weight: torch.Tensor) -> torch.Tensor:
    """An MLP's [gate; up] weight [2I, K] -> pack_bf16's layout with the 16-channel blocks reordered
    to gate 2j, 2j+1, up 2j, 2j+1 (j = 0 .. I/32 - 1): each strip of 4 blocks that
    torch.ops.lamina.bf16_packed_swiglu multiplies holds the gate and up rows of the same 32 channels."""
    n, k = weight.shape
    blocks = weight.detach().view(2, n // 64, 2, 16, k)          # [gate/up, j, block of the pair, 16, K]
    return pack_bf16(blocks.transpose(0, 1).reshape(n, k))


class Bf16SwiGLU(nn.Module):
    """An MLP's fused gate/up projection that returns silu(gate) * up itself: lamina's GEMM applies
    SwiGLU to its accumulators, so the [T, 2I] product (tens of MB a layer in a long prefill step)
    is never written to memory and read back. The result matches silu_and_mul of
    Bf16Linear's output bit for bit."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.register_buffer("packed", pack_bf16_swiglu(linear.weight))
        self.in_features, self.out_features = linear.in_features, linear.out_features // 2

    @staticmethod
    def fits(linear: nn.Linear) -> bool:
        return Bf16Linear.fits(linear) and linear.bias is None and linear.out_features % 64 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.lamina.bf16_packed_swiglu(x.reshape(-1, self.in_features).to(torch.bfloat16), self.packed)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def use_cpu_gemm(model: nn.Module) -> bool:
    """Route a bf16 CPU model's matmuls to lamina's C++ GEMM (an MLP's gate_up_proj to the SwiGLU
    one). False (nothing changed) where the kernels are unavailable."""
    linears = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear and Bf16Linear.fits(m)]
    if not linears or not cpu.usable(linears[0][1].weight):
        return False
    for name, linear in linears:
        swiglu = name.rpartition(".")[2] == "gate_up_proj" and Bf16SwiGLU.fits(linear)
        _replace(model, name, Bf16SwiGLU(linear) if swiglu else Bf16Linear(linear))
        if swiglu:   # the GEMM applies SwiGLU itself, so the MLP's own activation goes
            _replace(model, name.rpartition(".")[0] + ".act", nn.Identity())
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
