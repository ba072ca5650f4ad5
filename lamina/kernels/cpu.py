"""The "cpu" attention backend (`CpuOps`): `reference` with lamina's C++ kernels where they apply.

Paged decode attention and (bf16) prefill attention read the KV cache in place, where the torch path
gathers a padded copy first; SwiGLU and residual-add RMSNorm run in C++ for eager bf16 steps. The
kernels are built and loaded by cpu_build.py. `BatchInvariantCpuOps` are the ops of batch-invariant
mode: one C++ kernel per op for every step.
"""
from __future__ import annotations

import torch

from lamina.kernels import reference
from lamina.kernels.dispatch import AttentionPlan
from lamina.kernels.reference import rotary_embedding, store_kv_cache  # noqa: F401


def _eager_bf16(x: torch.Tensor) -> bool:
    """The C++ elementwise ops serve eager steps; a compiled step fuses torch's own."""
    return x.dtype == torch.bfloat16 and x.dim() == 2 and not torch.compiler.is_dynamo_compiling()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    if residual is not None and weight.dtype == torch.bfloat16 and _eager_bf16(x):
        return torch.ops.lamina.add_rms_norm(x, residual, weight, eps)
    return reference.rms_norm(x, weight, eps, residual)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if _eager_bf16(x):
        return torch.ops.lamina.silu_and_mul(x)
    return reference.silu_and_mul(x)


PREFILL_HEAD_DIMS = (64, 128)  # what paged_prefill_attention is built for


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, md, scale: float) -> torch.Tensor:
    """reference.paged_attention, in C++: decode batches, and prefill on a bf16 cache."""
    if not md.is_decode:
        if q.dtype == k_cache.dtype == torch.bfloat16 and q.shape[-1] in PREFILL_HEAD_DIMS:
            return torch.ops.lamina.paged_prefill_attention(q, k_cache, v_cache, md.block_tables,
                                                            md.query_start_loc, md.seq_lens, scale)
        return reference.paged_attention(q, k_cache, v_cache, md, scale)
    # float32 out; a bf16 q goes in as it is (on a bf16 cache the scores then come from bf16 pairs)
    out = torch.ops.lamina.paged_decode_attention(q if q.dtype == torch.bfloat16 else q.float(), k_cache, v_cache,
                                                  md.block_tables, md.seq_lens, scale)
    return out.to(q.dtype)


class CpuOps:
    """The cpu backend's five ops. Paged attention runs lamina's kernel ("lamina", `paged_attention`
    above) or the reference ("torch") for decode and for prefill steps, as the dispatch chose."""
    store_kv_cache = staticmethod(store_kv_cache)
    rotary_embedding = staticmethod(rotary_embedding)
    rms_norm = staticmethod(rms_norm)
    silu_and_mul = staticmethod(silu_and_mul)

    def __init__(self, attention: AttentionPlan = AttentionPlan()):
        self.attention = attention

    def paged_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, md, scale: float):
        impl = self.attention.decode if md.is_decode else self.attention.prefill
        if impl == "lamina":
            return paged_attention(q, k_cache, v_cache, md, scale)
        return reference.paged_attention(q, k_cache, v_cache, md, scale)


class BatchInvariantCpuOps:
    """The cpu backend's ops in batch-invariant mode: each op runs one of lamina's C++ kernels at every
    batch size, whose sums for a row run in an order fixed by that row alone (bf16 q and cache).

    Attention is always the prefill kernel, decode rows included: it reduces each query row over
    chunks of 64 keys counted from the sequence's first key, with an online softmax in that order,
    whatever rows share its tile. So a token gives the same bits in a decode step, in a prompt
    chunked anywhere, or beside any other sequences; the decode kernel's one-pass softmax rounds
    differently, and the reference's SDPA splits its work by query length. RMSNorm and SwiGLU are the
    C++ row loops (torch's reductions may split a long batch's rows across threads; its vectorized
    exp differs from the scalar one its loop tails take). RoPE and the cache write are the
    reference's: multiplies, adds and copies, exact per element."""
    store_kv_cache = staticmethod(store_kv_cache)
    rotary_embedding = staticmethod(rotary_embedding)

    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
        if residual is None:
            return torch.ops.lamina.rms_norm(x, weight, eps)
        return torch.ops.lamina.add_rms_norm(x, residual, weight, eps)

    @staticmethod
    def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.lamina.silu_and_mul(x)

    @staticmethod
    def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, md, scale: float):
        return torch.ops.lamina.paged_prefill_attention(q, k_cache, v_cache, md.block_tables, md.query_start_loc,
                                                        md.seq_lens, scale)
