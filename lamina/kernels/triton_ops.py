"""lamina's Triton kernels: the same four ops as `reference`, fused and fast on a GPU.

    store_kv_cache    scatter new K/V rows into the paged cache (slot -1 = padding, skipped)
    paged_attention   varlen prefill/extend kernel; pure-decode batches take a split-K
                      ("flash-decoding") kernel plus a reduction kernel
    rms_norm          fused (residual add +) RMSNorm, in float32 like the reference
    rotary_embedding  rotate-half RoPE, rounding like the reference so results match bit for bit
(and `silu_and_mul`, torch's own: two elementwise ops a compiled step fuses anyway)
`BatchInvariantOps` are the same ops for batch-invariant mode: attention takes one kernel, with
fixed tiles, for every step.

Every op reads its operands through strides, so views such as the q/k/v slices of a fused qkv
projection need no copy. No op syncs with the host: grid sizes come from the python ints in
`AttentionMetadata` (max_query_len, max_seq_len), never from device tensors.

On a machine without a GPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1),
which is how the tests check them against `reference`.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from lamina import envs
from lamina.kernels import AttentionMetadata
from lamina.kernels.reference import silu_and_mul  # noqa: F401

LOG2E = 1.4426950408889634  # softmax runs in base 2: exp(x) == exp2(x * log2(e))

# Decode split-K: aim for this many programs per SM, with splits no shorter than MIN and, so that
# one long sequence in a ragged batch does not leave the GPU idle behind it, no longer than MAX.
DECODE_PROGRAMS_PER_SM = 2
DECODE_MIN_SPLIT = 256
DECODE_MAX_SPLIT = 4096


def _pow2(n: int, at_least: int = 1) -> int:
    return max(triton.next_power_of_2(n), at_least)


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs would otherwise run through TF32 tensor cores (10-bit mantissa) on the GPU
    return "ieee" if dtype == torch.float32 else "tf32"


def _widen_dot(dtype: torch.dtype) -> bool:
    # The Triton interpreter multiplies bfloat16 tiles in tl.dot as their raw uint16 bits
    # (triton-lang/triton#11584), so under it bfloat16 tiles are widened to float32 first.
    return dtype == torch.bfloat16 and envs.triton_interpret()


def _attention_launch_config(dtype: torch.dtype, block_d: int) -> dict:
    """num_warps / num_stages that compile without register spills on sm_80/sm_90: bigger rows
    (float32, or head_dim 256) get 8 warps to spread the tiles over more registers."""
    wide = dtype == torch.float32 or block_d >= 256
    return dict(num_warps=8 if wide else 4, num_stages=2 if block_d >= 256 else 3)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


# ------------------------------------------------------------------------------------------------
# KV cache write
# ------------------------------------------------------------------------------------------------

@triton.jit
def _store_kv_cache_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_kc_block, stride_kc_slot, stride_kc_head,
    stride_vc_block, stride_vc_slot, stride_vc_head,
    num_kv_heads,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per new token: copy its [num_kv_heads, head_dim] K and V rows to their slot."""
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # padding token: nothing to store
        return
    block_id = slot // BLOCK_SIZE
    in_block = slot % BLOCK_SIZE

    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads < num_kv_heads)[:, None] & (dims < HEAD_DIM)[None, :]

    k = tl.load(k_ptr + token * stride_k_tok + heads[:, None] * stride_k_head + dims[None, :], mask=mask)
    v = tl.load(v_ptr + token * stride_v_tok + heads[:, None] * stride_v_head + dims[None, :], mask=mask)
    k_dst = k_cache_ptr + block_id * stride_kc_block + in_block * stride_kc_slot
    v_dst = v_cache_ptr + block_id * stride_vc_block + in_block * stride_vc_slot
    tl.store(k_dst + heads[:, None] * stride_kc_head + dims[None, :],
             k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst + heads[:, None] * stride_vc_head + dims[None, :],
             v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Write k/v [T, Hkv, D] into caches [num_blocks, block_size, Hkv, D] at flat slots; -1 skips."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    k, v = _last_dim_contiguous(k), _last_dim_contiguous(v)
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    _store_kv_cache_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        num_kv_heads,
        BLOCK_SIZE=k_cache.shape[1], HEAD_DIM=head_dim,
        BLOCK_H=_pow2(num_kv_heads), BLOCK_D=_pow2(head_dim),
    )


# ------------------------------------------------------------------------------------------------
# Attention
#
# Both attention kernels give one program all the query heads that share a KV head (grouped-query
# attention), so each K/V tile loaded from the cache serves every head of the group. Prefill packs
# (token, head-in-group) pairs into the tile's rows, row r = token r // GROUP, head r % GROUP; rows
# past the last whole group are masked (a group of 3 in 16 rows wastes one row). Decode has one
# token: its GROUP heads fill rows 0..GROUP-1 of a power-of-two tile of at least 16 rows (tl.dot's
# minimum), the rest masked.
# ------------------------------------------------------------------------------------------------

@triton.jit
def _attend_keys(
    acc, m_i, l_i, q, q_pos,
    k_cache_ptr, v_cache_ptr, block_table_ptr, kv_head, key_start, key_end,
    stride_kc_block, stride_kc_slot, stride_kc_head,
    stride_vc_block, stride_vc_slot, stride_vc_head,
    qk_scale,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, WIDEN_DOT: tl.constexpr,
):
    """Online softmax of the rows `q` over cached keys [key_start, key_end), causally masked
    against each row's absolute position `q_pos`. Carries (acc, m_i, l_i) in float32 and base 2:
    acc is the unnormalised output, m_i the running max score, l_i the running sum of weights."""
    offs_n = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    if WIDEN_DOT:
        q = q.to(tl.float32)
    for tile_start in range(key_start, key_end, BLOCK_N):
        key_pos = tile_start + offs_n
        key_ok = key_pos < key_end
        # each key's cache block comes from the block table: tiles need not align with blocks
        block_id = tl.load(block_table_ptr + key_pos // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
        in_block = key_pos % BLOCK_SIZE
        kv_mask = key_ok[:, None] & dim_ok[None, :]
        k_rows = block_id * stride_kc_block + in_block * stride_kc_slot + kv_head * stride_kc_head
        k = tl.load(k_cache_ptr + k_rows[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        if WIDEN_DOT:
            k = k.to(tl.float32)

        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        visible = key_ok[None, :] & (key_pos[None, :] <= q_pos[:, None])
        scores = tl.where(visible, scores, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(scores, 1))
        # a row that has seen no visible key yet keeps m = -inf; subtract 0 instead (no NaN)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(scores - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)

        v_rows = block_id * stride_vc_block + in_block * stride_vc_slot + kv_head * stride_vc_head
        v = tl.load(v_cache_ptr + v_rows[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        if WIDEN_DOT:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _prefill_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    query_start_loc_ptr, seq_lens_ptr, block_tables_ptr,
    stride_q_tok, stride_q_head, stride_o_tok, stride_o_head, stride_bt_seq,
    stride_kc_block, stride_kc_slot, stride_kc_head,
    stride_vc_block, stride_vc_slot, stride_vc_head,
    qk_scale,
    GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    WIDEN_DOT: tl.constexpr,
):
    """Varlen extend attention. Program (tile, seq, kv_head) handles BLOCK_M // GROUP new tokens of
    one sequence with all query heads of one KV head. A sequence's new tokens are the last
    `query_len` of its `seq_len` cached tokens: they see the whole cached prefix and, causally,
    each other. The new K/V are already in the cache, so every key comes through the block table."""
    TOKENS_PER_TILE: tl.constexpr = BLOCK_M // GROUP
    tile = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)

    query_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - query_start
    first_token = tile * TOKENS_PER_TILE
    if first_token >= query_len:  # the grid is sized for the longest sequence
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix_len = seq_len - query_len

    rows = tl.arange(0, BLOCK_M)
    token = first_token + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < TOKENS_PER_TILE * GROUP) & (token < query_len)
    q_pos = prefix_len + token  # absolute position of each row's token in its sequence
    dims = tl.arange(0, BLOCK_D)
    q_mask = row_ok[:, None] & (dims < HEAD_DIM)[None, :]
    q_rows = (query_start + token).to(tl.int64) * stride_q_tok + head * stride_q_head
    q = tl.load(q_ptr + q_rows[:, None] + dims[None, :], mask=q_mask, other=0.0)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # the tile's last token sees keys up to its own position; later keys are all masked
    key_end = tl.minimum(seq_len, prefix_len + first_token + TOKENS_PER_TILE)
    acc, m_i, l_i = _attend_keys(
        acc, m_i, l_i, q, q_pos, k_cache_ptr, v_cache_ptr, block_tables_ptr + seq * stride_bt_seq,
        kv_head, 0, key_end,
        stride_kc_block, stride_kc_slot, stride_kc_head, stride_vc_block, stride_vc_slot, stride_vc_head,
        qk_scale, BLOCK_SIZE, HEAD_DIM, BLOCK_N, BLOCK_D, DOT_PRECISION, WIDEN_DOT)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_rows = (query_start + token).to(tl.int64) * stride_o_tok + head * stride_o_head
    tl.store(out_ptr + o_rows[:, None] + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def _decode_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    query_start_loc_ptr, seq_lens_ptr, block_tables_ptr,
    stride_q_tok, stride_q_head, stride_o_tok, stride_o_head, stride_bt_seq,
    stride_kc_block, stride_kc_slot, stride_kc_head,
    stride_vc_block, stride_vc_slot, stride_vc_head,
    stride_po_seq, stride_po_head, stride_po_split, stride_pl_seq, stride_pl_head,
    qk_scale, split_size,
    GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr, WIDEN_DOT: tl.constexpr,
):
    """Decode, split-K: program (seq, kv_head, split) attends the one new token's GROUP query heads
    over keys [split * split_size, +split_size) of the sequence. Splitting the context lets a small
    batch fill the GPU. Each split leaves its normalised partial output and log-sum-exp for
    `_decode_reduce_kernel`; with a single split the program writes the final output itself."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + seq)
    token = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - token
    key_start = split * split_size
    if (key_start >= seq_len) | (query_len == 0):  # shorter than the longest, or a padding entry
        return
    key_end = tl.minimum(key_start + split_size, seq_len)

    rows = tl.arange(0, BLOCK_H)
    head = kv_head * GROUP + rows
    dims = tl.arange(0, BLOCK_D)
    mask = (rows < GROUP)[:, None] & (dims < HEAD_DIM)[None, :]
    q_rows = token.to(tl.int64) * stride_q_tok + head * stride_q_head
    q = tl.load(q_ptr + q_rows[:, None] + dims[None, :], mask=mask, other=0.0)
    q_pos = tl.full([BLOCK_H], 0, dtype=tl.int32) + (seq_len - 1)

    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc, m_i, l_i = _attend_keys(
        acc, m_i, l_i, q, q_pos, k_cache_ptr, v_cache_ptr, block_tables_ptr + seq * stride_bt_seq,
        kv_head, key_start, key_end,
        stride_kc_block, stride_kc_slot, stride_kc_head, stride_vc_block, stride_vc_slot, stride_vc_head,
        qk_scale, BLOCK_SIZE, HEAD_DIM, BLOCK_N, BLOCK_D, DOT_PRECISION, WIDEN_DOT)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    if SINGLE_SPLIT:
        o_rows = token.to(tl.int64) * stride_o_tok + head * stride_o_head
        tl.store(out_ptr + o_rows[:, None] + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        po_rows = seq * stride_po_seq + head * stride_po_head + split * stride_po_split
        tl.store(part_out_ptr + po_rows[:, None] + dims[None, :], out, mask=mask)
        lse = m_i + tl.log2(l_safe)  # base-2 log-sum-exp of this split's scores
        tl.store(part_lse_ptr + seq * stride_pl_seq + head * stride_pl_head + split, lse, mask=rows < GROUP)


@triton.jit
def _decode_reduce_kernel(
    out_ptr, part_out_ptr, part_lse_ptr, query_start_loc_ptr, seq_lens_ptr,
    stride_o_tok, stride_o_head, stride_po_seq, stride_po_head, stride_po_split,
    stride_pl_seq, stride_pl_head, split_size,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS_PER_STEP: tl.constexpr,
):
    """Merge one (seq, head)'s split outputs: out = sum_s w_s * out_s / sum_s w_s with
    w_s = 2^(lse_s - max lse). Only the splits that cover the sequence's own length exist."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    token = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - token
    if (seq_len == 0) | (query_len == 0):  # a padding entry: no split wrote anything
        return
    num_splits = tl.cdiv(seq_len, split_size)
    lse_base = part_lse_ptr + seq * stride_pl_seq + head * stride_pl_head
    offs_s = tl.arange(0, SPLITS_PER_STEP)

    lse_max = tl.full([SPLITS_PER_STEP], float("-inf"), dtype=tl.float32)
    for s0 in range(0, num_splits, SPLITS_PER_STEP):
        lse = tl.load(lse_base + s0 + offs_s, mask=s0 + offs_s < num_splits, other=float("-inf"))
        lse_max = tl.maximum(lse_max, lse)
    global_max = tl.max(lse_max, 0)

    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    weight_sum = tl.zeros([SPLITS_PER_STEP], dtype=tl.float32)
    part_base = part_out_ptr + seq * stride_po_seq + head * stride_po_head
    for s0 in range(0, num_splits, SPLITS_PER_STEP):
        split_ok = s0 + offs_s < num_splits
        lse = tl.load(lse_base + s0 + offs_s, mask=split_ok, other=float("-inf"))
        weight = tl.where(split_ok, tl.exp2(lse - global_max), 0.0)
        part = tl.load(part_base + (s0 + offs_s)[:, None] * stride_po_split + dims[None, :],
                       mask=split_ok[:, None] & dim_ok[None, :], other=0.0)
        acc += tl.sum(weight[:, None] * part, 0)
        weight_sum += weight
    out = acc / tl.sum(weight_sum, 0)
    tl.store(out_ptr + token.to(tl.int64) * stride_o_tok + head * stride_o_head + dims,
             out.to(out_ptr.dtype.element_ty), mask=dim_ok)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _decode_split_size(num_seqs: int, num_kv_heads: int, max_seq_len: int, device: torch.device,
                       block_n: int) -> int:
    """Tokens per split: enough splits to give every SM DECODE_PROGRAMS_PER_SM programs, none
    shorter than DECODE_MIN_SPLIT nor longer than DECODE_MAX_SPLIT. A multiple of block_n."""
    wanted = triton.cdiv(DECODE_PROGRAMS_PER_SM * _num_sms(device), num_seqs * num_kv_heads)
    splits = max(1, min(wanted, triton.cdiv(max_seq_len, DECODE_MIN_SPLIT)))
    splits = max(splits, triton.cdiv(max_seq_len, DECODE_MAX_SPLIT))
    per_split = triton.cdiv(max_seq_len, splits)
    return triton.cdiv(per_split, block_n) * block_n


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    md: AttentionMetadata, scale: float, *, split_size: int | None = None,
                    block_m: int | None = None, block_n: int | None = None,
                    batch_invariant: bool = False) -> torch.Tensor:
    """q [T, Hq, D] attends causally over its own sequence's cached K/V; returns [T, Hq, D].

    Keyword-only tuning knobs (the defaults suit a GPU; tests shrink them to cross tile and split
    boundaries on tiny inputs): `split_size` = decode keys per split (a multiple of the key tile),
    `block_m` = query rows per prefill tile, `block_n` = keys per tile.

    batch_invariant: every step, pure decode included, runs the prefill kernel, whose tiles depend
    on the model's shapes alone: each query row reduces over key tiles of `block_n` counted from
    the sequence's first key, in order, whichever rows share its tile. Decode's split-K, whose
    split size follows the batch, is never used."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    assert num_heads % num_kv_heads == 0, "query heads must be a multiple of KV heads"
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    group = num_heads // num_kv_heads
    q = _last_dim_contiguous(q)
    out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    num_seqs = md.seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    block_d = _pow2(head_dim, 16)
    # keep a K or V tile around 16 KB: 64 keys of head_dim 128 in 16 bits
    if block_n is None:
        block_n = 64 if block_d * k_cache.element_size() <= 256 else 32
    qk_scale = scale * LOG2E
    common = dict(GROUP=group, BLOCK_SIZE=block_size, HEAD_DIM=head_dim, BLOCK_N=block_n,
                  BLOCK_D=block_d, DOT_PRECISION=_dot_precision(q.dtype), WIDEN_DOT=_widen_dot(q.dtype),
                  **_attention_launch_config(q.dtype, block_d))
    cache_strides = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                     v_cache.stride(0), v_cache.stride(1), v_cache.stride(2))
    tables = md.block_tables

    if md.max_query_len > 1 or batch_invariant:
        if block_m is None:
            block_m = 64
        block_m = _pow2(max(block_m, group), 16)  # tl.dot wants 16 rows or more
        tokens_per_tile = block_m // group
        grid = (triton.cdiv(md.max_query_len, tokens_per_tile), num_seqs, num_kv_heads)
        _prefill_attention_kernel[grid](
            q, k_cache, v_cache, out, md.query_start_loc, md.seq_lens, tables,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1), tables.stride(0),
            *cache_strides, qk_scale, BLOCK_M=block_m, **common)
        return out

    # pure decode: one new token per sequence
    if split_size is None:
        split_size = _decode_split_size(num_seqs, num_kv_heads, md.max_seq_len, q.device, block_n)
    assert split_size % block_n == 0, "split_size must be a multiple of the key tile"
    num_splits = triton.cdiv(md.max_seq_len, split_size)
    single = num_splits == 1
    if single:
        part_out = part_lse = out  # unused
        po_strides, pl_strides = (0, 0, 0), (0, 0)
    else:
        part_out = torch.empty((num_seqs, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((num_seqs, num_heads, num_splits), dtype=torch.float32, device=q.device)
        po_strides, pl_strides = part_out.stride()[:3], part_lse.stride()[:2]
    _decode_attention_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, out, part_out, part_lse, md.query_start_loc, md.seq_lens, tables,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), tables.stride(0),
        *cache_strides, *po_strides, *pl_strides, qk_scale, split_size,
        BLOCK_H=_pow2(group, 16), SINGLE_SPLIT=single, **common)
    if not single:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            out, part_out, part_lse, md.query_start_loc, md.seq_lens,
            out.stride(0), out.stride(1), *po_strides, *pl_strides, split_size,
            HEAD_DIM=head_dim, BLOCK_D=block_d, SPLITS_PER_STEP=min(_pow2(num_splits), 16))
    return out


# ------------------------------------------------------------------------------------------------
# RMSNorm
# ------------------------------------------------------------------------------------------------

@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, new_residual_ptr,
    stride_x, stride_r, stride_o, stride_nr, n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program per row. Rounds where the reference rounds: x + residual to the activation
    dtype, the normalised row to the activation dtype before the weight multiply."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        summed = (x + residual).to(new_residual_ptr.dtype.element_ty)
        tl.store(new_residual_ptr + row * stride_nr + cols, summed, mask=mask)
        x = summed.to(tl.float32)
    # new_residual_ptr always has the activation dtype (without a residual it is x itself)
    variance = tl.sum(x * x, 0) / n_cols
    normed = (x * tl.rsqrt(variance + eps)).to(new_residual_ptr.dtype.element_ty).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (weight * normed).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm in float32, as transformers computes it; with `residual`, adds it first and
    returns (normed, x + residual) so the caller carries the new residual stream."""
    shape, hidden = x.shape, x.shape[-1]
    x2 = _last_dim_contiguous(x).reshape(-1, hidden)
    act_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, act_dtype), device=x.device)
    if residual is not None:
        r2 = _last_dim_contiguous(residual).reshape(-1, hidden)
        new_residual = torch.empty(x2.shape, dtype=act_dtype, device=x.device)
    else:
        r2 = new_residual = x2  # not written; its dtype tells the kernel the activation dtype
    rows = x2.shape[0]
    if rows:
        block = _pow2(hidden)
        _rms_norm_kernel[(rows,)](
            x2, r2, weight.contiguous(), out, new_residual,
            x2.stride(0), r2.stride(0), out.stride(0), new_residual.stride(0), hidden, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block,
            num_warps=4 if block <= 1024 else 8 if block <= 4096 else 16)
    out = out.view(shape)
    return out if residual is None else (out, new_residual.view(shape))


# ------------------------------------------------------------------------------------------------
# Rotary embedding
# ------------------------------------------------------------------------------------------------

@triton.jit
def _rotate_heads(
    x_ptr, out_ptr, token, stride_x_tok, stride_x_head, stride_o_tok, stride_o_head, num_heads,
    cos, sin,
    HEAD_DIM: tl.constexpr, ROT_HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_TAIL: tl.constexpr,
):
    """Rotate-half RoPE of one token's heads: out = x * cos + rotate_half(x) * sin on the first
    2 * ROT_HALF dims, the rest copied. Each product is rounded to x's dtype before the sum, as
    the reference (and transformers) computes it in that dtype."""
    dtype = out_ptr.dtype.element_ty
    heads = tl.arange(0, BLOCK_H)
    half = tl.arange(0, BLOCK_HALF)
    mask = (heads < num_heads)[:, None] & (half < ROT_HALF)[None, :]
    src = x_ptr + token * stride_x_tok + heads[:, None] * stride_x_head
    dst = out_ptr + token * stride_o_tok + heads[:, None] * stride_o_head
    x1 = tl.load(src + half[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + ROT_HALF + half[None, :], mask=mask, other=0.0).to(tl.float32)
    c = cos.to(dtype).to(tl.float32)[None, :]
    s = sin.to(dtype).to(tl.float32)[None, :]
    x1c = (x1 * c).to(dtype).to(tl.float32)
    x2s = (x2 * s).to(dtype).to(tl.float32)
    x2c = (x2 * c).to(dtype).to(tl.float32)
    x1s = (x1 * s).to(dtype).to(tl.float32)
    tl.store(dst + half[None, :], (x1c - x2s).to(dtype), mask=mask)
    tl.store(dst + ROT_HALF + half[None, :], (x2c + x1s).to(dtype), mask=mask)
    if BLOCK_TAIL > 0:  # partial rotary: dims past the rotated ones pass through
        tail = 2 * ROT_HALF + tl.arange(0, BLOCK_TAIL)
        tail_mask = (heads < num_heads)[:, None] & (tail < HEAD_DIM)[None, :]
        kept = tl.load(src + tail[None, :], mask=tail_mask, other=0.0)
        tl.store(dst + tail[None, :], kept.to(dtype), mask=tail_mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, positions_ptr, cos_sin_ptr,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head,
    stride_qo_tok, stride_qo_head, stride_ko_tok, stride_ko_head, stride_cs_pos,
    num_q_heads, num_k_heads,
    HEAD_DIM: tl.constexpr, ROT_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr, BLOCK_TAIL: tl.constexpr,
):
    """One program per token: look its cos/sin row up once, rotate all its q and k heads."""
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    half = tl.arange(0, BLOCK_HALF)
    row = cos_sin_ptr + pos * stride_cs_pos
    cos = tl.load(row + half, mask=half < ROT_HALF, other=0.0).to(tl.float32)
    sin = tl.load(row + ROT_HALF + half, mask=half < ROT_HALF, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr, q_out_ptr, token, stride_q_tok, stride_q_head, stride_qo_tok, stride_qo_head,
                  num_q_heads, cos, sin, HEAD_DIM, ROT_HALF, BLOCK_HQ, BLOCK_HALF, BLOCK_TAIL)
    _rotate_heads(k_ptr, k_out_ptr, token, stride_k_tok, stride_k_head, stride_ko_tok, stride_ko_head,
                  num_k_heads, cos, sin, HEAD_DIM, ROT_HALF, BLOCK_HK, BLOCK_HALF, BLOCK_TAIL)


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE on q [T, Hq, D] and k [T, Hkv, D]; the cache holds [max_pos, rot_dim] as
    cos | sin halves. Dimensions past rot_dim (partial rotary) pass through. Returns new tensors."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    rot_dim = cos_sin_cache.shape[-1]
    assert rot_dim % 2 == 0 and rot_dim <= head_dim
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    cos_sin_cache = _last_dim_contiguous(cos_sin_cache)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens:
        tail = head_dim - rot_dim
        _rotary_kernel[(num_tokens,)](
            q, k, q_out, k_out, positions, cos_sin_cache,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), cos_sin_cache.stride(0),
            num_q_heads, num_k_heads,
            HEAD_DIM=head_dim, ROT_HALF=rot_dim // 2, BLOCK_HQ=_pow2(num_q_heads),
            BLOCK_HK=_pow2(num_k_heads), BLOCK_HALF=_pow2(rot_dim // 2),
            BLOCK_TAIL=_pow2(tail) if tail else 0)
    return q_out, k_out


class BatchInvariantOps:
    """The ops of batch-invariant mode. Attention runs `paged_attention(..., batch_invariant=True)`;
    RMSNorm and RoPE are already one program per row (token), reducing in an order fixed by the
    row's width; the cache write copies."""
    store_kv_cache = staticmethod(store_kv_cache)
    rms_norm = staticmethod(rms_norm)
    rotary_embedding = staticmethod(rotary_embedding)
    silu_and_mul = staticmethod(silu_and_mul)

    @staticmethod
    def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        md: AttentionMetadata, scale: float) -> torch.Tensor:
        return paged_attention(q, k_cache, v_cache, md, scale, batch_invariant=True)
