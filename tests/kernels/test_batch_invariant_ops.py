"""The kernels of batch-invariant mode. Attention: a query row gets the same bits in a whole prompt,
in a later chunk of it, or as a decode step, beside any other sequences. GEMMs: a row gets the same
bits at any row count. (tests/engine/test_batch_invariant.py checks the whole engine.)"""
import pytest
import torch

from lamina.kernels import AttentionMetadata, get_backend

BLOCK_SIZE = 16
# the Triton kernels run on the GPU where there is one, else interpreted (tests/conftest.py)
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _cache(lengths, kv_heads, head_dim, dtype, seed=0):
    """K/V of sequences of `lengths` tokens in a shuffled block pool; their block tables."""
    g = torch.Generator().manual_seed(seed)
    per_seq = [-(-n // BLOCK_SIZE) for n in lengths]
    order = torch.randperm(sum(per_seq), generator=g).to(torch.int32)
    tables = torch.zeros(len(lengths), max(per_seq), dtype=torch.int32)
    at = 0
    for i, n in enumerate(per_seq):
        tables[i, :n] = order[at:at + n]
        at += n
    shape = (sum(per_seq), BLOCK_SIZE, kv_heads, head_dim)
    k = torch.randn(shape, generator=g).to(dtype)
    v = torch.randn(shape, generator=g).to(dtype)
    return k, v, tables


def _attend(ops, q, k, v, tables, steps):
    """Attention of one step: `steps` lists (sequence, first new position, new tokens); q holds each
    sequence's query rows by position. Returns each entry's output rows."""
    rows = torch.cat([q[s][first:first + n] for s, first, n in steps])
    counts = [n for _, _, n in steps]
    dev = rows.device
    md = AttentionMetadata(
        query_start_loc=torch.tensor([0] + counts, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(dev),
        seq_lens=torch.tensor([first + n for _, first, n in steps], dtype=torch.int32, device=dev),
        block_tables=tables[[s for s, _, _ in steps]],
        slot_mapping=torch.zeros(len(rows), dtype=torch.int64, device=dev),
        max_query_len=max(counts), max_seq_len=max(first + n for _, first, n in steps))
    out = ops.paged_attention(rows, k, v, md, q[0].shape[-1] ** -0.5)
    return out.split(counts)


@pytest.mark.parametrize("backend,heads,kv_heads,head_dim,dtype", [
    ("cpu", 9, 3, 64, torch.bfloat16),
    ("triton", 4, 2, 16, torch.bfloat16),
    # in float32 (no bf16 rounding of the output to hide it) decode's split-K would differ
    ("triton", 4, 2, 16, torch.float32),
])
def test_a_row_is_the_same_alone_chunked_or_decoded(backend, heads, kv_heads, head_dim, dtype, request):
    if backend == "cpu":
        request.getfixturevalue("cpu_kernels")
    device = "cpu" if backend == "cpu" else TRITON_DEVICE
    ops = get_backend(backend, device, batch_invariant=True).ops
    lengths = [150, 40, 97]
    k, v, tables = (t.to(device) for t in _cache(lengths, kv_heads, head_dim, dtype))
    g = torch.Generator().manual_seed(1)
    q = [torch.randn(n, heads, head_dim, generator=g).to(device, dtype) for n in lengths]
    whole = _attend(ops, q, k, v, tables, [(0, 0, 150)])[0]
    # chunked at 64 beside another prompt, and beside a decode row
    chunks = [_attend(ops, q, k, v, tables, [(1, 0, 40), (0, 0, 64)])[1],
              _attend(ops, q, k, v, tables, [(0, 64, 64), (2, 96, 1)])[0],
              _attend(ops, q, k, v, tables, [(2, 0, 30), (0, 128, 22)])[1]]
    assert torch.equal(torch.cat(chunks), whole)
    # decode steps: one row of the sequence at a time, alone and in batches of other decodes
    for position in (0, 63, 64, 100, 149):
        alone = _attend(ops, q, k, v, tables, [(0, position, 1)])[0]
        batched = _attend(ops, q, k, v, tables, [(1, 39, 1), (2, 50, 1), (0, position, 1)])[2]
        assert torch.equal(alone, whole[position:position + 1]) and torch.equal(batched, alone)


def test_only_backends_with_batch_invariant_kernels_offer_the_mode():
    assert get_backend("triton", "cpu", batch_invariant=True).batch_invariant
    assert not get_backend("triton", "cpu").batch_invariant
    with pytest.raises(ValueError, match="torch attention backend has no batch-invariant mode"):
        get_backend("torch", "cpu", batch_invariant=True)


@pytest.mark.parametrize("layer", ["Bf16Linear", "Bf16SwiGLU", "Int8Linear", "Int4Linear"])
def test_gemm_rows_do_not_depend_on_the_batch(layer, cpu_kernels):
    """lamina's GEMMs, which batch-invariant mode pins at every row count: each output row is the
    same bits at any row count and any offset into the register tiles and parallel chunks."""
    from torch import nn

    from lamina import layers
    from lamina.kernels.dispatch import RowPlan
    torch.manual_seed(0)
    linear = nn.Linear(320, 192, bias=False).to(torch.bfloat16)
    gemm = getattr(layers, layer)(linear, RowPlan("lamina", "lamina", "lamina"))
    x = torch.randn(300, 320).to(torch.bfloat16)
    with torch.inference_mode():
        full = gemm(x)
        for first, rows in ((0, 1), (5, 1), (3, 7), (8, 9), (40, 17), (1, 130), (150, 150)):
            assert torch.equal(gemm(x[first:first + rows]), full[first:first + rows]), (first, rows)
