"""Attention and KV-cache ops behind one interface, with three implementations.

`reference` is plain torch: the oracle of every test, and the CPU path where lamina's C++ kernels
cannot be built (`lamina env` says why). `cpu` is `reference` with paged attention, SwiGLU and
RMSNorm in C++ where they apply (the CPU default). `triton_ops`
holds lamina's Triton kernels, used on CUDA. All three modules export the same five functions:

    store_kv_cache(k, v, k_cache, v_cache, slot_mapping)
    paged_attention(q, k_cache, v_cache, attn_metadata, scale) -> out
    rms_norm(x, weight, eps, residual=None) -> out | (out, new_residual)
    rotary_embedding(q, k, positions, cos_sin_cache) -> (q, k)
    silu_and_mul(x) -> silu(x[..., :I]) * x[..., I:]

`get_backend()` picks one: an explicit name, else $LAMINA_ATTENTION_BACKEND, else triton on
CUDA, and on CPU cpu (or torch, where the C++ kernels are unavailable).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from types import ModuleType

import torch

BACKENDS = ("torch", "cpu", "triton")


@dataclass
class AttentionMetadata:
    """Everything the attention layers need to know about one flat batch.

    The batch packs the new tokens of B sequences one after another (T tokens in all).
    """
    query_start_loc: torch.Tensor   # [B+1] int32: sequence i's new tokens are rows qsl[i]:qsl[i+1]
    seq_lens: torch.Tensor          # [B] int32: tokens in the KV cache after this step (prefix + new)
    block_tables: torch.Tensor      # [B, max_blocks] int32: the cache blocks of each sequence, in order
    slot_mapping: torch.Tensor      # [T] int64: where each new token's K/V goes; -1 = padding, not stored
    max_query_len: int              # longest run of new tokens (1 for a pure decode batch)
    max_seq_len: int                # longest seq_len
    logits_indices: torch.Tensor | None = None  # rows whose logits are wanted; None = all rows
    # a stored bool, not a property: a compiled step then guards on it alone, where reading
    # max_query_len would specialize the graph on that int
    is_decode: bool = field(init=False)

    def __post_init__(self):
        self.is_decode = self.max_query_len == 1

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]


def get_backend(name: str | None = None, device: torch.device | str = "cpu") -> ModuleType:
    name = name or os.environ.get("LAMINA_ATTENTION_BACKEND") or _default_backend(torch.device(device))
    if name == "torch":
        from lamina.kernels import reference
        return reference
    if name == "cpu":
        from lamina.kernels import cpu
        if not cpu.load():
            raise RuntimeError("the cpu attention backend needs lamina's C++ kernels, which could not be loaded "
                               f"here: {cpu.load_error()}")
        return cpu
    if name == "triton":
        from lamina.kernels import triton_ops
        return triton_ops
    raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")


def _default_backend(device: torch.device) -> str:
    if device.type == "cuda":
        return "triton"
    from lamina.kernels import cpu
    return "cpu" if cpu.load() else "torch"
