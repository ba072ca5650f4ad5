"""The cpu backend's C++ paged decode attention against the torch reference on the same cache."""
import pytest
import torch

from lamina.kernels import AttentionMetadata, cpu, get_backend, reference

pytestmark = pytest.mark.skipif(not cpu.load(), reason="no C++ compiler to build lamina's CPU kernels")


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


def test_prefill_takes_the_reference_path_and_the_backend_is_the_cpu_default():
    assert get_backend(None, "cpu") is cpu or __import__("os").environ.get("LAMINA_ATTENTION_BACKEND")
    q, k_cache, v_cache, md = _paged_case([40], 4, 2, 32, 16, torch.float32)
    prefill = AttentionMetadata(query_start_loc=torch.tensor([0, 40], dtype=torch.int32), seq_lens=md.seq_lens,
                                block_tables=md.block_tables, slot_mapping=torch.zeros(40, dtype=torch.int64),
                                max_query_len=40, max_seq_len=40)
    qs = torch.randn(40, 4, 32)
    torch.testing.assert_close(cpu.paged_attention(qs, k_cache, v_cache, prefill, 0.2),
                               reference.paged_attention(qs, k_cache, v_cache, prefill, 0.2))


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
