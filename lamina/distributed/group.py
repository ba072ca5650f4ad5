"""A rank's place in the tensor-parallel group, passed explicitly to whatever needs it."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from lamina.distributed.sharding import Shard


@dataclass(frozen=True)
class ParallelContext:
    rank: int
    world_size: int
    device: torch.device
    group: dist.ProcessGroup

    @property
    def shard(self) -> Shard:
        return Shard(self.rank, self.world_size)

    # Under torch.compile the collectives are the functional ones (torch.ops._c10d_functional),
    # which return new tensors and so trace into a graph. Eagerly, a step's all-reduces run in place
    # on the layer's fresh output: a quarter less time each over gloo, and a step has two a layer.
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of x over the ranks (x itself may hold it)."""
        if torch.compiler.is_compiling():
            c10d = torch.ops._c10d_functional
            return c10d.wait_tensor(c10d.all_reduce(x, "sum", self.group.group_name))
        dist.all_reduce(x, group=self.group)
        return x

    def max_over_ranks(self, x: torch.Tensor) -> torch.Tensor:
        """The elementwise maximum of x over the ranks (at load, not in a step)."""
        x = x.clone()
        dist.all_reduce(x, dist.ReduceOp.MAX, group=self.group)
        return x

    def all_gather_columns(self, x: torch.Tensor) -> torch.Tensor:
        """[T, C] on each rank -> [T, world_size * C], rank 0's columns first."""
        c10d = torch.ops._c10d_functional
        rows = c10d.wait_tensor(c10d.all_gather_into_tensor(x.contiguous(), self.world_size, self.group.group_name))
        return rows.view(self.world_size, *x.shape).movedim(0, 1).reshape(x.shape[0], self.world_size * x.shape[1])


def distributed_backend(device: torch.device) -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"
