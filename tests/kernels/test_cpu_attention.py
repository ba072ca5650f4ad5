"""The cpu backend's C++ paged attention (decode, and prefill on a bf16 cache) against the torch
reference on the same cache."""
import platform

import pytest
import torch

from lamina.kernels import AttentionMetadata, cpu, cpu_build, get_backend, reference

pytestmark = pytest.mark.usefixtures("cpu_kernels")  # skips only where no build is expected (conftest.py)


def _paged_case(seq_lens, heads, kv_heads, head_dim, block_size, dtype, seed=0):
    """A shuffled block pool holding each sequence's K/V, and decode metadata for it."""
    g = torch.Generator().manual_seed(seed)
    per_seq = [(n + block_size - 1) // block_size for n in seq_lens]
    num_blocks = sum(per_seq) + 3
    order = torch.randperm(num_blocks, generator=g)[:sum(per_seq)].to(torch.int32)
    width = max(per_seq) + 1  # one column more than needed: never read
    tables = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    at = 0
    for i, nb in enumerate(per_seq):
        tables[i, :nb] = order[at:at + nb]
        at += nb
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=g).to(dtype)
    v_cache = torch.randn(shape, generator=g).to(dtype)
    q = torch.randn(len(seq_lens), heads, head_dim, generator=g)
    md = AttentionMetadata(query_start_loc=torch.arange(len(seq_lens) + 1, dtype=torch.int32),
                           seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=tables,
                           slot_mapping=torch.zeros(len(seq_lens), dtype=torch.int64), max_query_len=1,
                           max_seq_len=max(seq_lens))
    return q, k_cache, v_cache, md


@pytest.mark.parametrize("seq_lens,heads,kv_heads,head_dim,block_size", [
    ([1], 9, 3, 64, 16),                       # SmolLM2's heads, one cached token
    ([37, 5, 200, 16, 17], 9, 3, 64, 16),      # mixed lengths, block edges
    ([70] * 20, 8, 8, 32, 8),                  # no GQA, a batch past the length-grouping threshold
    ([33, 130], 4, 1, 24, 16),                 # head_dim not a multiple of 16 (the plain tail)
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_matches_reference(seq_lens, heads, kv_heads, head_dim, block_size, dtype):
    q, k_cache, v_cache, md = _paged_case(seq_lens, heads, kv_heads, head_dim, block_size, dtype)
    scale = head_dim ** -0.5
    ref = reference.paged_attention(q, k_cache.float(), v_cache.float(), md, scale)
    got = cpu.paged_attention(q, k_cache, v_cache, md, scale)
    assert got.shape == q.shape and got.dtype == q.dtype
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    # a bf16 q (what a bf16 model has): on a bf16 cache its scores come from bf16 pairs
    qb = q.to(torch.bfloat16)
    ref = reference.paged_attention(qb.float(), k_cache.float(), v_cache.float(), md, scale)
    got = torch.ops.lamina.paged_decode_attention(qb, k_cache, v_cache, md.block_tables, md.seq_lens, scale)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def _prefill_case(new_tokens, cached, heads, kv_heads, head_dim, block_size=16, seed=0):
    """Sequences with `cached` tokens already in the cache and `new_tokens` arriving (a chunk, or a
    prompt after a reused prefix), in one flat prefill batch."""
    lens = [n + c for n, c in zip(new_tokens, cached)]
    q, k_cache, v_cache, md = _paged_case(lens, heads, kv_heads, head_dim, block_size, torch.bfloat16, seed)
    g = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(sum(new_tokens), heads, head_dim, generator=g).to(torch.bfloat16)
    starts = torch.tensor([0] + new_tokens).cumsum(0).to(torch.int32)
    md = AttentionMetadata(query_start_loc=starts, seq_lens=md.seq_lens, block_tables=md.block_tables,
                           slot_mapping=torch.zeros(sum(new_tokens), dtype=torch.int64),
                           max_query_len=max(new_tokens), max_seq_len=max(lens))
    return q, k_cache, v_cache, md


PREFILL_CASES = [
    ([1], [0], 9, 3, 64),                        # one token, nothing cached
    ([40], [0], 9, 3, 64),                       # a prompt within one key chunk (64) and query tile (64)
    ([130], [5], 9, 3, 64),                      # 3 query tiles; 135 keys: a last chunk of 7 (odd, whole 16-key groups empty)
    ([17, 3, 64, 1], [0, 20, 33, 70], 9, 3, 64),  # a batch: prompts, chunks after a cached prefix, a decode row
    ([100], [37], 9, 3, 64),
    ([33], [7], 8, 8, 128),                      # no GQA, head_dim 128
    ([50], [0], 4, 1, 128),                      # 4 query heads per KV head
]


def _check_prefill(ops, case):
    q, k_cache, v_cache, md = _prefill_case(*case)
    scale = case[-1] ** -0.5
    ref = reference.paged_attention(q.float(), k_cache.float(), v_cache.float(), md, scale)
    got = ops.paged_prefill_attention(q, k_cache, v_cache, md.block_tables, md.query_start_loc, md.seq_lens, scale)
    assert got.shape == q.shape and got.dtype == torch.bfloat16
    # scores and softmax in float32; the probabilities meet the values as bf16 (2^-9 relative each,
    # as in flash attention's bf16 kernels) and the output is rounded to bf16 once
    torch.testing.assert_close(got.float(), ref, rtol=2 ** -8, atol=4e-3)


@pytest.mark.parametrize("case", PREFILL_CASES)
def test_prefill_attention_matches_reference(case):
    _check_prefill(torch.ops.lamina, case)


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the baseline build targets x86-64")
def test_prefill_attention_plain_path_matches_reference():
    """The same source built for an x86-64-v2 CPU (no AVX-512): what other machines run."""
    assert cpu_build.load(namespace="lamina_plain", march="x86-64-v2")
    for case in PREFILL_CASES:
        _check_prefill(torch.ops.lamina_plain, case)


def test_backend_routes_prefill_by_dtype_and_is_the_cpu_default():
    """bf16 prefill goes to C++; float32 (and head sizes the kernel lacks) to the reference."""
    assert isinstance(get_backend(None, "cpu").ops, cpu.CpuOps) or __import__("os").environ.get("LAMINA_ATTENTION_BACKEND")
    q, k_cache, v_cache, md = _prefill_case([40], [8], 6, 2, 64)
    torch.testing.assert_close(cpu.paged_attention(q, k_cache, v_cache, md, 0.2).float(),
                               reference.paged_attention(q.float(), k_cache.float(), v_cache.float(), md, 0.2),
                               rtol=2 ** -8, atol=4e-3)
    for dtype, head_dim in ((torch.float32, 64), (torch.bfloat16, 32)):
        q, k_cache, v_cache, md = _prefill_case([40], [8], 4, 2, head_dim)
        q, k_cache, v_cache = q.to(dtype), k_cache.to(dtype), v_cache.to(dtype)
        torch.testing.assert_close(cpu.paged_attention(q, k_cache, v_cache, md, 0.2),
                                   reference.paged_attention(q, k_cache, v_cache, md, 0.2))


def test_prefill_rejects_bad_metadata_with_a_clear_error():
    q, k_cache, v_cache, md = _prefill_case([20], [4], 4, 2, 64)
    with pytest.raises(RuntimeError, match="a block table of"):
        torch.ops.lamina.paged_prefill_attention(q, k_cache, v_cache, md.block_tables, md.query_start_loc,
                                                 md.seq_lens + 100, 0.2)
    with pytest.raises(RuntimeError, match="q must be bfloat16"):
        torch.ops.lamina.paged_prefill_attention(q.float(), k_cache, v_cache, md.block_tables, md.query_start_loc,
                                                 md.seq_lens, 0.2)


def test_a_block_table_too_short_is_an_error():
    q, k_cache, v_cache, md = _paged_case([20], 4, 2, 32, 16, torch.float32)
    md.seq_lens[0] = 100  # more tokens than the table's blocks hold
    with pytest.raises(RuntimeError, match="more than its block table holds"):
        cpu.paged_attention(q, k_cache, v_cache, md, 0.2)


def test_compiles_into_one_graph():
    q, k_cache, v_cache, md = _paged_case([20, 3], 4, 2, 32, 16, torch.float32)

    def f(q, bt, sl):
        return torch.ops.lamina.paged_decode_attention(q * 2, k_cache, v_cache, bt, sl, 0.5) + 1

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(q, md.block_tables, md.seq_lens), f(q, md.block_tables, md.seq_lens))


def test_bench_cpu_attention_script_runs():
    """bench/cpu_attention.py (the decode-attention roofline study in RESULTS.md) on a tiny case."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, os.path.join(root, "bench", "cpu_attention.py"), "--seqs", "2,3",
                          "--len", "40", "--threads", "1", "--rounds", "1"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [(r[1], r[3]) for r in rows] == [("2", "shuffled"), ("2", "in"), ("3", "shuffled"), ("3", "in")], out
    assert all(float(r[-4]) > 0 and float(r[-1]) > 0 for r in rows), out
