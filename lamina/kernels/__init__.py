"""Attention and KV-cache ops behind one interface (`Ops`), with three implementations.

`reference` is plain torch: the oracle of every test, and the CPU path where lamina's C++ kernels
cannot be built (`lamina env` says why). `cpu.CpuOps` is `reference` with paged attention, SwiGLU
and RMSNorm in C++ where they apply (the CPU default), its attention by the implementations the
kernel dispatch chose (dispatch.py). `triton_ops` holds lamina's Triton kernels, used on CUDA. Each
provides the same five functions:

    store_kv_cache(k, v, k_cache, v_cache, slot_mapping)
    paged_attention(q, k_cache, v_cache, attn_metadata, scale) -> out
    rms_norm(x, weight, eps, residual=None) -> out | (out, new_residual)
    rotary_embedding(q, k, positions, cos_sin_cache) -> (q, k)
    silu_and_mul(x) -> silu(x[..., :I]) * x[..., I:]

`get_backend()` returns a `Backend`: one of these as the model's ops, plus what the engine's
execution strategies may do with them. The runner asks the backend; it never tests which one it is.
A new backend is a module (or object) with these five functions and one entry in `get_backend`.
In batch-invariant mode `get_backend` returns a backend's batch-invariant ops instead (cpu and triton
have them), whose results for a row never depend on the other rows of the call.
cpu_build.py builds and loads the C++ kernels; lamina/cpu_features.py asks the OS what this CPU may run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from lamina import envs
from lamina.kernels.dispatch import AttentionPlan

BACKENDS = ("torch", "cpu", "triton")


class Ops(Protocol):
    """What a model's layers call; see the module's docstring for the shapes."""
    def store_kv_cache(self, k, v, k_cache, v_cache, slot_mapping) -> None: ...
    def paged_attention(self, q, k_cache, v_cache, attn_metadata, scale) -> torch.Tensor: ...
    def rms_norm(self, x, weight, eps, residual=None): ...
    def rotary_embedding(self, q, k, positions, cos_sin_cache): ...
    def silu_and_mul(self, x) -> torch.Tensor: ...


@dataclass(frozen=True)
class Backend:
    name: str                    # as --attention-backend takes it
    ops: Ops                     # the five functions above
    # torch.compile can trace its ops into a CPU step (Triton's interpreter, for one, cannot be traced)
    compilable: bool
    # the largest decode batch a compiled step may take (None: any); past it, steps run eagerly
    compiled_decode_max_batch: int | None = None
    # head sizes whose bf16 prefill and mixed steps compile (attention as one op); () for none
    compiled_prefill_head_dims: tuple[int, ...] = ()
    # decode steps can be captured in CUDA graphs (no host syncs inside)
    cuda_graphs: bool = False
    # its ops give each row the same bits whatever other rows share the call (batch-invariant mode)
    batch_invariant: bool = False


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


def get_backend(name: str | None = None, device: torch.device | str = "cpu",
                attention: AttentionPlan | None = None, batch_invariant: bool = False) -> Backend:
    """An explicit name, else $LAMINA_ATTENTION_BACKEND, else `default_backend_name(device)`. The cpu
    backend's attention follows `attention` (the dispatch's choice; lamina's kernels by default).
    With batch_invariant, the backend's batch-invariant ops (a ValueError where it has none); they
    run eagerly, one kernel per op for every batch, so none of them compiles or captures."""
    device = torch.device(device)
    name = name or envs.attention_backend() or default_backend_name(device)
    from lamina.kernels import reference
    if batch_invariant:
        return _batch_invariant_backend(name, device)
    if name == "torch":
        # larger decode batches are grouped by length in eager attention, which a graph cannot do
        return Backend("torch", reference, compilable=device.type == "cpu",
                       compiled_decode_max_batch=reference.GROUP_BY_LENGTH_MIN_BATCH - 1)
    if name == "cpu":
        from lamina.kernels import cpu, cpu_build
        if not cpu_build.load():
            raise RuntimeError("the cpu attention backend needs lamina's C++ kernels, which could not be loaded "
                               f"here: {cpu_build.load_error()}")
        attention = attention or AttentionPlan()
        return Backend("cpu", cpu.CpuOps(attention), compilable=True,
                       # reference decode attention groups large batches by length, which a graph cannot do
                       compiled_decode_max_batch=None if attention.decode == "lamina"
                       else reference.GROUP_BY_LENGTH_MIN_BATCH - 1,
                       # compiled prefill steps need attention as one op (the reference loops over sequences)
                       compiled_prefill_head_dims=cpu.PREFILL_HEAD_DIMS if attention.prefill == "lamina" else ())
    if name == "triton":
        from lamina.kernels import triton_ops
        return Backend("triton", triton_ops, compilable=False, cuda_graphs=device.type == "cuda")
    raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")


def _batch_invariant_backend(name: str, device: torch.device) -> Backend:
    if name == "cpu":
        from lamina.kernels import cpu, cpu_build
        if not cpu_build.load():
            raise RuntimeError("batch-invariant mode on CPU needs lamina's C++ kernels, which could not be loaded "
                               f"here: {cpu_build.load_error()}")
        return Backend("cpu", cpu.BatchInvariantCpuOps(), compilable=False, batch_invariant=True)
    if name == "triton":
        from lamina.kernels import triton_ops
        return Backend("triton", triton_ops.BatchInvariantOps(), compilable=False, batch_invariant=True)
    if name == "torch":
        raise ValueError("the torch attention backend has no batch-invariant mode (torch's attention splits its "
                         "work by query length); use the cpu or triton backend")
    raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")


def default_backend_name(device: torch.device) -> str:
    """triton on CUDA; on CPU cpu where lamina's C++ kernels load, else torch."""
    if device.type == "cuda":
        return "triton"
    from lamina.kernels import cpu_build
    return "cpu" if cpu_build.load() else "torch"
