"""bf16 linear layers on CPU, each running the implementation the kernel dispatch chose for its row count.

lamina's GEMM reads a weight packed once at load (`pack_bf16`), where torch's matmul repacks it on
every call; torch's matmul (oneDNN) runs on AMX where the OS grants it. Which wins depends on the CPU
and the rows (kernels/dispatch.py measures it), so a layer keeps the weight layouts of the
implementations its plan uses, and only those. An MLP's fused gate/up projection can apply SwiGLU
inside lamina's GEMM (`Bf16SwiGLU`): the [T, 2I] product is then never written to memory.
"""
from __future__ import annotations

import abc

import torch
from torch import nn

from lamina.kernels import reference
from lamina.kernels import cpu_build
from lamina.kernels.dispatch import RowPlan, default_plan


class PlannedLinear(nn.Module, metaclass=abc.ABCMeta):
    """A linear layer with several implementations, one per class of row counts (its `plan`).
    Subclasses set `op` (the dispatch's name) and `run(impl, x)` on 2-D inputs."""
    op: str
    in_features: int
    out_features: int

    def __init__(self, linear: nn.Linear, plan: RowPlan | None):
        super().__init__()
        self.register_parameter("bias", None)     # a subclass sets the nn.Linear's, where it has one
        self.plan = plan or default_plan(self.op, self.impls(linear))

    @staticmethod
    @abc.abstractmethod
    def impls(linear: nn.Linear, device: torch.device | None = None) -> tuple[str, ...]:
        """The implementations that can serve `linear` on `device` (default: where its weight is)."""

    @property
    def use_kernel(self) -> bool:
        """Whether lamina's kernel serves some row counts (its packed layout is kept)."""
        return self.plan.uses("lamina")

    @abc.abstractmethod
    def run(self, impl: str, x: torch.Tensor) -> torch.Tensor:
        """`impl`'s product of 2-D x."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y = self.run(self.plan.pick(flat.shape[0]), flat).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, plan=({self.plan})"


def _kernels(linear: nn.Linear, device: torch.device | None) -> bool:
    """Whether lamina's C++ kernels can serve `linear` on `device` (default: where its weight is)."""
    device = device or linear.weight.device
    return device.type == "cpu" and cpu_build.load()


def pack_bf16(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [N/16, K/2, 16, 2]: what torch.ops.lamina.bf16_packed_linear reads (one 64-byte
    load = 2 input channels of 16 output channels, VDPBF16PS's operand)."""
    n, k = weight.shape
    return weight.detach().view(n // 16, 16, k // 2, 2).permute(0, 2, 1, 3).contiguous()


class Bf16Linear(PlannedLinear):
    """A bf16 nn.Linear on CPU: lamina's packed GEMM ("lamina") or torch's matmul ("torch")."""
    op = "bf16_linear"

    def __init__(self, linear: nn.Linear, plan: RowPlan | None = None):
        super().__init__(linear, plan)
        if self.plan.uses("lamina"):
            self.register_buffer("packed", pack_bf16(linear.weight))
        if self.plan.uses("torch"):
            self.register_buffer("weight", linear.weight.detach())
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    @staticmethod
    def fits(linear: nn.Linear) -> bool:
        """Whether lamina's GEMM takes this layer: bf16, blocks of 16 outputs, pairs of inputs."""
        return (linear.weight.dtype == torch.bfloat16 and linear.out_features % 16 == 0
                and linear.in_features % 2 == 0)

    @staticmethod
    def impls(linear: nn.Linear, device: torch.device | None = None) -> tuple[str, ...]:
        return ("lamina",) * (_kernels(linear, device) and Bf16Linear.fits(linear)) + ("torch",)

    def run(self, impl: str, x: torch.Tensor) -> torch.Tensor:
        if impl == "lamina":
            return torch.ops.lamina.bf16_packed_linear(x.to(torch.bfloat16), self.packed).to(x.dtype)
        return nn.functional.linear(x, self.weight)


def pack_bf16_swiglu(weight: torch.Tensor) -> torch.Tensor:
    """An MLP's [gate; up] weight [2I, K] -> pack_bf16's layout with the 16-channel blocks reordered
    to gate 2j, 2j+1, up 2j, 2j+1 (j = 0 .. I/32 - 1): each strip of 4 blocks that
    torch.ops.lamina.bf16_packed_swiglu multiplies holds the gate and up rows of the same 32 channels."""
    n, k = weight.shape
    blocks = weight.detach().view(2, n // 64, 2, 16, k)          # [gate/up, j, block of the pair, 16, K]
    return pack_bf16(blocks.transpose(0, 1).reshape(n, k))


class Bf16SwiGLU(PlannedLinear):
    """An MLP's fused gate/up projection that returns silu(gate) * up itself: in lamina's GEMM, which
    applies SwiGLU to its accumulators ("lamina"; it matches silu_and_mul of Bf16Linear's output bit
    for bit), or as torch's matmul followed by SwiGLU ("torch")."""
    op = "bf16_swiglu"

    def __init__(self, linear: nn.Linear, plan: RowPlan | None = None):
        super().__init__(linear, plan)
        if self.plan.uses("lamina"):
            self.register_buffer("packed", pack_bf16_swiglu(linear.weight))
        if self.plan.uses("torch"):
            self.register_buffer("weight", linear.weight.detach())
        self.in_features, self.out_features = linear.in_features, linear.out_features // 2

    @staticmethod
    def fits(linear: nn.Linear) -> bool:
        return Bf16Linear.fits(linear) and linear.bias is None and linear.out_features % 64 == 0

    @staticmethod
    def impls(linear: nn.Linear, device: torch.device | None = None) -> tuple[str, ...]:
        return ("lamina",) * (_kernels(linear, device) and Bf16SwiGLU.fits(linear)) + ("torch",)

    def run(self, impl: str, x: torch.Tensor) -> torch.Tensor:
        if impl == "lamina":
            return torch.ops.lamina.bf16_packed_swiglu(x.to(torch.bfloat16), self.packed).to(x.dtype)
        return reference.silu_and_mul(nn.functional.linear(x, self.weight))
