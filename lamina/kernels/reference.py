"""Plain-torch implementations of lamina's ops: the CPU path and the oracle for the Triton kernels."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lamina.kernels import AttentionMetadata


def store_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Write k/v [T, Hkv, D] into caches [num_blocks, block_size, Hkv, D] at flat slots; -1 skips."""
    num_kv_heads, head_dim = k_cache.shape[-2:]
    # the check reads a value back (a sync); compiled decode steps skip it, as lamina's engine
    # never pads the batches it compiles
    if not torch.compiler.is_dynamo_compiling() and bool((slot_mapping < 0).any()):
        keep = slot_mapping >= 0
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    # index_put_ (not index_copy_): torch.compile updates it in place instead of copying the cache
    k_cache.view(-1, num_kv_heads, head_dim)[slot_mapping] = k.to(k_cache.dtype)
    v_cache.view(-1, num_kv_heads, head_dim)[slot_mapping] = v.to(v_cache.dtype)


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """The first `length` cached tokens of one sequence as [length, Hkv, D], in `dtype`."""
    block_size = cache.shape[1]
    num_blocks = (length + block_size - 1) // block_size
    return _gather_blocks(cache, block_table[:num_blocks]).flatten(0, 1)[:length].to(dtype)


def _gather_blocks(cache: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """cache[table] for a block table of any shape. index_select copies whole blocks (several KB
    each) at memory speed, several times faster on CPU than advanced indexing, which goes element-wise."""
    return cache.index_select(0, table.reshape(-1).long()).view(*table.shape, *cache.shape[1:])


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    md: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [T, Hq, D] attends causally over its own sequence's cached K/V; returns [T, Hq, D].
    The math runs in float32 on CPU (torch's CPU attention is several times faster there than in
    bf16; gathered blocks are converted), else in the cache's dtype."""
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    gqa = num_heads != num_kv_heads
    out_dtype, q = q.dtype, q.to(torch.float32 if q.device.type == "cpu" else k_cache.dtype)
    if md.is_decode:
        return _decode_attention(q, k_cache, v_cache, md, scale, gqa).to(out_dtype)
    out = torch.empty_like(q)
    starts = md.query_start_loc.tolist()
    lens = md.seq_lens.tolist()
    for i, seq_len in enumerate(lens):
        start, end = starts[i], starts[i + 1]
        if end == start:
            continue
        # 4-D [1, H, L, D]: torch's fused (flash) CPU attention takes nothing else; 3-D inputs
        # fall back to the unfused math path, half of a 512-token prefill's time
        k = _gather_context(k_cache, md.block_tables[i], seq_len, q.dtype).transpose(0, 1)[None]  # [1, Hkv, L, D]
        v = _gather_context(v_cache, md.block_tables[i], seq_len, q.dtype).transpose(0, 1)[None]
        qi = q[start:end].transpose(0, 1)[None]                                       # [1, Hq, Lq, D]
        num_new = end - start
        if num_new == seq_len:
            o = F.scaled_dot_product_attention(qi, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            # new token j sits at absolute position seq_len - num_new + j and sees keys up to it
            q_pos = torch.arange(seq_len - num_new, seq_len, device=q.device)
            mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]
            o = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
        out[start:end] = o[0].transpose(0, 1)
    return out.to(out_dtype)


# decode batches from this size are split into groups of similar length (see _decode_attention)
GROUP_BY_LENGTH_MIN_BATCH = 16


def _decode_attention(q, k_cache, v_cache, md: AttentionMetadata, scale: float, gqa: bool) -> torch.Tensor:
    """One new token per sequence. Gathering pads every sequence to the longest, so a large
    batch of mixed lengths is split into groups of similar length first (eager mode only)."""
    if not torch.compiler.is_dynamo_compiling() and md.num_seqs >= GROUP_BY_LENGTH_MIN_BATCH:
        lens = md.seq_lens.tolist()
        order = sorted(range(len(lens)), key=lens.__getitem__)
        groups, start = [], 0
        for i in range(1, len(order) + 1):  # cut where a group's longest would be > 1.5x its shortest
            if i == len(order) or lens[order[i]] > 1.5 * lens[order[start]] + 16:
                groups.append(order[start:i])
                start = i
        if len(groups) > 1:
            out = torch.empty_like(q)
            bs = k_cache.shape[1]
            for g in groups:
                idx = torch.tensor(g, device=q.device)
                width = (lens[g[-1]] + bs - 1) // bs
                out[idx] = _padded_decode_attention(q[idx], k_cache, v_cache, md.block_tables[idx, :width],
                                                    md.seq_lens[idx], scale, gqa)
            return out
    return _padded_decode_attention(q, k_cache, v_cache, md.block_tables, md.seq_lens, scale, gqa)


def _padded_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale: float, gqa: bool) -> torch.Tensor:
    """Gather every sequence's blocks at once and mask the tail. The block table is exactly as
    wide as the longest sequence needs, which keeps every shape here a tensor dimension (so a
    compiled decode step need not recompile per length)."""
    batch = block_tables.shape[0]
    k = _gather_blocks(k_cache, block_tables).flatten(1, 2).transpose(1, 2).to(q.dtype)  # [B, Hkv, L, D]
    v = _gather_blocks(v_cache, block_tables).flatten(1, 2).transpose(1, 2).to(q.dtype)
    length = k.shape[2]
    mask = torch.arange(length, device=q.device)[None, :] < seq_lens[:, None]
    o = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask[:, None, None, :],
                                       scale=scale, enable_gqa=gqa)
    return o.view(batch, q.shape[1], q.shape[2])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm in float32, as transformers computes it; with `residual`, adds it first and
    returns (normed, x + residual) so the caller carries the new residual stream."""
    if residual is not None:
        x = x + residual
        residual = x
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * h.to(x.dtype)
    return out if residual is None else (out, residual)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation on the fused gate|up projection [T, 2I] -> [T, I]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE on q [T, Hq, D] and k [T, Hkv, D]; the cache holds [max_pos, rot_dim] as
    cos | sin halves. Dimensions past rot_dim (partial rotary) pass through."""
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)  # [T, rot_dim/2] each
    cos = torch.cat((cos, cos), -1)[:, None, :]
    sin = torch.cat((sin, sin), -1)[:, None, :]
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rot_dim = cos.shape[-1]
    xr = x[..., :rot_dim]
    x1, x2 = xr.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    out = (xr * cos.to(x.dtype)) + (rotated * sin.to(x.dtype))
    if rot_dim == x.shape[-1]:
        return out
    return torch.cat((out, x[..., rot_dim:]), dim=-1)
