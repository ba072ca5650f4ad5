"""Which part of the model one rank of N holds: Megatron's layout over the hand-written Llama.

qkv_proj and gate_up_proj are split by output (column-parallel: each rank owns whole attention
heads and a slice of the MLP's channels); o_proj and down_proj by input (row-parallel: their
partial products are summed across ranks); the embedding and lm_head by vocabulary rows. Where N
exceeds the KV heads, each rank holds one KV head and ranks whose query heads share it hold a copy.
"""
from __future__ import annotations

from dataclasses import dataclass

from lamina.config import ModelConfig


@dataclass(frozen=True)
class Part:
    """Rows `start:start+length` of a tensor's dimension `dim`."""
    dim: int
    start: int
    length: int


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    size: int = 1

    def check(self, cfg: ModelConfig) -> None:
        """ValueError, naming the head counts, where the model cannot be split N ways."""
        n, hq, hkv = self.size, cfg.num_attention_heads, cfg.num_key_value_heads
        if n < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {n}")
        if hq % n:
            raise ValueError(f"tensor_parallel_size {n} must divide the model's {hq} query heads")
        if n <= hkv and hkv % n:
            raise ValueError(f"tensor_parallel_size {n} must divide the model's {hkv} KV heads")
        if n > hkv and n % hkv:
            raise ValueError(f"tensor_parallel_size {n} exceeds the model's {hkv} KV heads, so they are "
                             f"replicated, which needs a multiple of {hkv}")
        if cfg.intermediate_size % n:
            raise ValueError(f"tensor_parallel_size {n} must divide the MLP's {cfg.intermediate_size} channels")

    def q_heads(self, cfg: ModelConfig) -> tuple[int, int]:
        """(first, count) of this rank's query heads."""
        per = cfg.num_attention_heads // self.size
        return self.rank * per, per

    def kv_heads(self, cfg: ModelConfig) -> tuple[int, int]:
        """(first, count) of this rank's KV heads: its share, or the one its query heads read."""
        hkv = cfg.num_key_value_heads
        if self.size <= hkv:
            per = hkv // self.size
            return self.rank * per, per
        return self.rank * hkv // self.size, 1

    def channels(self, cfg: ModelConfig) -> tuple[int, int]:
        """(first, count) of this rank's MLP channels."""
        per = cfg.intermediate_size // self.size
        return self.rank * per, per

    def vocab_rows(self, cfg: ModelConfig) -> int:
        """Rows of each rank's embedding and lm_head: the vocabulary split evenly, the last ranks'
        padded with zero rows (the gathered logits are cut back to the vocabulary)."""
        return -(-cfg.vocab_size // self.size)

    def vocab(self, cfg: ModelConfig) -> tuple[int, int]:
        """(first, count) of the vocabulary rows this rank holds real weights for."""
        per = self.vocab_rows(cfg)
        start = min(self.rank * per, cfg.vocab_size)
        return start, min(per, cfg.vocab_size - start)
