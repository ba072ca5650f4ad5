"""The layers that combine tensor-parallel ranks' parts of the model (lamina/distributed/sharding.py).

A sharded model is built with plain layers at its local shapes; `parallelize` then wraps the three
kinds of layer whose output needs the other ranks:

    RowParallel            o_proj, down_proj: each rank multiplies its slice of the input channels;
                           the partial products are summed (all-reduce), then the bias is added once
    VocabParallelEmbedding each rank looks up the ids in its vocabulary rows, zeros elsewhere; summed
    GatheredLogits         lm_head: each rank's vocabulary columns of the logits, gathered on every rank

Column-parallel layers (qkv_proj, gate_up_proj) need nothing: each rank's heads and channels are
its own until the row-parallel layer after them. The wrapped layer may be any linear layer
(nn.Linear, Bf16Linear, Int8Linear, Int4Linear): quantization applies to each rank's shard.
"""
from __future__ import annotations

import torch
from torch import nn

from lamina.distributed.group import ParallelContext

ROW_PARALLEL = ("o_proj", "down_proj")


class RowParallel(nn.Module):
    def __init__(self, inner: nn.Module, parallel: ParallelContext):
        super().__init__()
        self.inner = inner
        self.bias = inner.bias         # added after the sum, not once per rank
        inner.bias = None
        self.parallel = parallel
        self.in_features, self.out_features = inner.in_features, inner.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.parallel.all_reduce(self.inner(x))
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    def __init__(self, embedding: nn.Embedding, first: int, count: int, parallel: ParallelContext):
        super().__init__()
        self.weight = embedding.weight     # the same parameter: a tied lm_head keeps sharing it
        self.first, self.count = first, count
        self.parallel = parallel

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.first
        mine = (local >= 0) & (local < self.count)
        x = nn.functional.embedding(torch.where(mine, local, 0), self.weight)
        return self.parallel.all_reduce(x * mine.unsqueeze(-1).to(x.dtype))


class GatheredLogits(nn.Module):
    def __init__(self, inner: nn.Module, vocab_size: int, parallel: ParallelContext):
        super().__init__()
        self.inner = inner
        self.vocab_size = vocab_size
        self.parallel = parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.parallel.all_gather_columns(self.inner(x))[:, :self.vocab_size]


def parallelize(model: nn.Module, parallel: ParallelContext) -> None:
    """Wrap a sharded model's layers (after build_linears chose each projection's layer)."""
    cfg = model.config
    for name, module in list(model.named_modules()):
        if name.rpartition(".")[2] in ROW_PARALLEL:
            _replace(model, name, RowParallel(module, parallel))
    first, count = model.shard.vocab(cfg)
    model.embed_tokens = VocabParallelEmbedding(model.embed_tokens, first, count, parallel)
    model.lm_head = GatheredLogits(model.lm_head, cfg.vocab_size, parallel)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
