"""lamina's Triton kernels equal the torch reference ops.

Without a GPU the kernels run under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so shapes stay small; the tile and split sizes are shrunk through
`paged_attention`'s keyword knobs so that short contexts still cross many key tiles, query tiles
and decode splits. `test_kernels_compile_for_gpu` separately runs the real compiler for sm_80
and sm_90, which catches code the interpreter accepts but a GPU build would not.

Tolerances:
- float32: atol = rtol = 1e-5 (only the summation order differs from torch).
- float16 / bfloat16 attention: against a float32 reference on the same (rounded) inputs,
  atol = rtol = 2e-3 (fp16) and 1.6e-2 (bf16): the probabilities are rounded to 16 bits before
  the P @ V product and the output is rounded once, a few units in the last place.
- rms_norm / rotary in fp16: within one fp16 ulp of the reference (they round where it rounds).
  In bf16, one or two bf16 ulps: the interpreter truncates float32 -> bfloat16 where a GPU (and
  torch) rounds to nearest, so the low bit can differ here though not on a GPU.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lamina.kernels import AttentionMetadata, reference, triton_ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATTN_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# one unit in the last place at 1.0, for ops that round exactly where the reference rounds
ULP = {torch.float32: 1e-5, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}

HEAD_DIMS = [64, 128]
GQA = [(2, 2), (6, 2), (8, 1)]  # (query heads, KV heads): ratios 1, 3 (not a power of two), 8
BLOCK_SIZES = [16, 32]


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def make_paged_batch(seqs, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=0):
    """A batch of sequences given as (cached prefix length, new tokens), laid out in a paged cache.

    Blocks come from a shuffled pool, so block tables are non-contiguous; every cache slot that
    no sequence owns holds random garbage, and table entries past a sequence's last block point
    at random blocks, so reading anything outside a sequence shows up as a wrong result. The new
    tokens' K/V are written first, as the model does before attending."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-(prefix + new) // block_size) for prefix, new in seqs]
    num_blocks = sum(blocks_per_seq) + 3
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    pool = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(blocks_per_seq)
    tables, slots, query_start_loc, seq_lens = [], [], [0], []
    for (prefix, new), n in zip(seqs, blocks_per_seq):
        table = [pool.pop() for _ in range(n)]
        slots += [table[p // block_size] * block_size + p % block_size for p in range(prefix, prefix + new)]
        tables.append(table + torch.randint(0, num_blocks, (width - n,), generator=gen).tolist())
        query_start_loc.append(query_start_loc[-1] + new)
        seq_lens.append(prefix + new)
    num_tokens = query_start_loc[-1]
    q = torch.randn(num_tokens, num_heads, head_dim, generator=gen).to(dtype)
    k_new = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype)
    v_new = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype)
    md = AttentionMetadata(
        query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        max_query_len=max(new for _, new in seqs),
        max_seq_len=max(seq_lens),
    )
    reference.store_kv_cache(k_new, v_new, k_cache, v_cache, md.slot_mapping)
    return _to(DEVICE, q, k_cache, v_cache, md)


def _to(device, q, k_cache, v_cache, md):
    md = AttentionMetadata(md.query_start_loc.to(device), md.seq_lens.to(device), md.block_tables.to(device),
                           md.slot_mapping.to(device), md.max_query_len, md.max_seq_len)
    return q.to(device), k_cache.to(device), v_cache.to(device), md


def reference_attention(q, k_cache, v_cache, md, scale):
    """The torch reference in float32 on the same (already rounded) inputs."""
    return reference.paged_attention(q.float(), k_cache.float(), v_cache.float(), md, scale)


def assert_attention_close(out, q, k_cache, v_cache, md, scale):
    ref = reference_attention(q, k_cache, v_cache, md, scale)
    tol = ATTN_TOL[q.dtype]
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


class NoHostSync:
    """Fails the test if the op reads a device tensor back to python (.item / .tolist / bool)."""

    def __enter__(self):
        self.saved = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__bool__")}

        def refuse(*args, **kwargs):
            raise AssertionError("host sync inside a kernel op")
        for name in self.saved:
            setattr(torch.Tensor, name, refuse)
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(torch.Tensor, name, fn)


# ------------------------------------------------------------------------------------------------
# store_kv_cache
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("num_kv_heads,head_dim", [(1, 64), (2, 128), (3, 80)])
def test_store_kv_cache(dtype, block_size, num_kv_heads, head_dim):
    gen = torch.Generator().manual_seed(1)
    num_blocks, num_tokens = 6, 23
    # k and v are views into one fused projection, as the model hands them over
    kv = torch.randn(num_tokens, 2 * num_kv_heads + 1, head_dim, generator=gen).to(dtype)
    k, v = kv[:, :num_kv_heads], kv[:, num_kv_heads:2 * num_kv_heads]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[[0, 5, 6, num_tokens - 1]] = -1  # padding tokens
    caches = [torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
              for _ in range(2)]
    ours = [c.clone().to(DEVICE) for c in caches]
    with NoHostSync():
        triton_ops.store_kv_cache(k.to(DEVICE), v.to(DEVICE), *ours, slots.to(DEVICE))
    reference.store_kv_cache(k, v, *caches, slots)
    assert torch.equal(ours[0].cpu(), caches[0]) and torch.equal(ours[1].cpu(), caches[1])


def test_store_kv_cache_casts_to_cache_dtype():
    k = torch.randn(5, 2, 64)
    v = torch.randn(5, 2, 64)
    slots = torch.tensor([3, -1, 17, 0, 30])
    caches = [torch.zeros(2, 16, 2, 64, dtype=torch.float16) for _ in range(2)]
    ours = [c.clone().to(DEVICE) for c in caches]
    triton_ops.store_kv_cache(k.to(DEVICE), v.to(DEVICE), *ours, slots.to(DEVICE))
    reference.store_kv_cache(k, v, *caches, slots)
    assert torch.equal(ours[0].cpu(), caches[0]) and torch.equal(ours[1].cpu(), caches[1])


# ------------------------------------------------------------------------------------------------
# paged_attention: decode (split-K kernel + reduction)
# ------------------------------------------------------------------------------------------------

def decode_seqs(block_size):
    """Context lengths: 1, exactly one block, one past it, one short of two, many blocks."""
    lengths = [1, block_size, block_size + 1, 2 * block_size - 1, 3 * block_size + 5, 150]
    return [(n - 1, 1) for n in lengths]


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("num_heads,num_kv_heads", GQA)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_decode_attention(head_dim, num_heads, num_kv_heads, block_size):
    q, k_cache, v_cache, md = make_paged_batch(decode_seqs(block_size), num_heads, num_kv_heads,
                                               head_dim, block_size, torch.float32)
    scale = head_dim ** -0.5
    # splits of 32 keys: the 150-token context spans 5 splits, each of two 16-key tiles
    with NoHostSync():
        out = triton_ops.paged_attention(q, k_cache, v_cache, md, scale, split_size=32, block_n=16)
    assert_attention_close(out, q, k_cache, v_cache, md, scale)


def test_decode_single_split_and_default_sizes():
    """The default tiles/splits (one split here: the kernel writes the output directly)."""
    q, k_cache, v_cache, md = make_paged_batch(decode_seqs(16), 6, 2, 64, 16, torch.float32)
    out = triton_ops.paged_attention(q, k_cache, v_cache, md, 0.125)
    assert_attention_close(out, q, k_cache, v_cache, md, 0.125)


def test_decode_many_splits():
    """More splits than the reduction merges per step (16), with short and long sequences."""
    seqs = [(599, 1), (3, 1), (260, 1)]
    q, k_cache, v_cache, md = make_paged_batch(seqs, 3, 1, 64, 16, torch.float32)
    out = triton_ops.paged_attention(q, k_cache, v_cache, md, 0.125, split_size=16, block_n=16)
    assert_attention_close(out, q, k_cache, v_cache, md, 0.125)


def test_decode_split_heuristic(monkeypatch):
    """Enough splits to fill the GPU, none longer than 4096 keys, tile-aligned."""
    monkeypatch.setattr(triton_ops, "_num_sms", lambda device: 132)
    split, cuda = triton_ops._decode_split_size, torch.device("cuda")
    assert split(1, 8, 32768, cuda, 64) == 1024      # one sequence, 8 KV heads: 32 splits of 1k
    assert split(256, 8, 512, cuda, 64) == 512       # a big batch fills the GPU unsplit
    assert split(256, 8, 32768, cuda, 64) == 4096    # but a long context is still cut up
    assert split(1, 8, 100, cuda, 64) == 128         # short: one split, tile-aligned


# ------------------------------------------------------------------------------------------------
# paged_attention: prefill / extend (varlen kernel)
# ------------------------------------------------------------------------------------------------

def extend_seqs(block_size):
    """(cached prefix, new tokens): fresh prompts, a prompt of exactly one block, prefixes ending
    on and off block boundaries, and single new tokens (decodes mixed into a prefill batch)."""
    return [(0, 1), (0, 21), (0, block_size), (block_size, block_size + 3), (5, 2 * block_size - 3),
            (40, 1), (2 * block_size - 1, 9)]


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("num_heads,num_kv_heads", GQA)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_extend_attention(head_dim, num_heads, num_kv_heads, block_size):
    q, k_cache, v_cache, md = make_paged_batch(extend_seqs(block_size), num_heads, num_kv_heads,
                                               head_dim, block_size, torch.float32, seed=2)
    scale = head_dim ** -0.5
    # 16-row query tiles (16 // group tokens each) and 16-key tiles: many tiles per sequence
    with NoHostSync():
        out = triton_ops.paged_attention(q, k_cache, v_cache, md, scale, block_m=16, block_n=16)
    assert_attention_close(out, q, k_cache, v_cache, md, scale)


def test_extend_default_tiles_and_q_view():
    """Default tile sizes, and q as a strided view of a fused qkv projection."""
    seqs = extend_seqs(16)
    q, k_cache, v_cache, md = make_paged_batch(seqs, 8, 1, 64, 16, torch.float32, seed=3)
    fused = torch.randn(q.shape[0], 8 + 2, 64, device=DEVICE)
    fused[:, :8] = q
    out = triton_ops.paged_attention(fused[:, :8], k_cache, v_cache, md, 0.125)
    assert_attention_close(out, q, k_cache, v_cache, md, 0.125)


@pytest.mark.parametrize("head_dim", [16, 32, 80, 256])
def test_attention_other_head_dims(head_dim):
    """Powers of two down to 16 and up to 256, and a padded non-power of two (80)."""
    scale = head_dim ** -0.5
    for seqs, kw in ((extend_seqs(16)[:4], dict(block_m=16, block_n=16)),
                     (decode_seqs(16)[2:], dict(split_size=32, block_n=16))):
        q, k_cache, v_cache, md = make_paged_batch(seqs, 3, 1, head_dim, 16, torch.float32, seed=4)
        out = triton_ops.paged_attention(q, k_cache, v_cache, md, scale, **kw)
        assert_attention_close(out, q, k_cache, v_cache, md, scale)


def test_block_size_not_a_power_of_two():
    scale = 0.125
    for seqs, kw in ((extend_seqs(12), dict(block_m=16, block_n=16)),
                     (decode_seqs(12), dict(split_size=32, block_n=16))):
        q, k_cache, v_cache, md = make_paged_batch(seqs, 2, 2, 64, 12, torch.float32, seed=5)
        out = triton_ops.paged_attention(q, k_cache, v_cache, md, scale, **kw)
        assert_attention_close(out, q, k_cache, v_cache, md, scale)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["decode", "extend"])
def test_attention_low_precision(dtype, mode):
    seqs, kw = ((decode_seqs(16), dict(split_size=32, block_n=16)) if mode == "decode"
                else (extend_seqs(16), dict(block_m=16, block_n=16)))
    q, k_cache, v_cache, md = make_paged_batch(seqs, 6, 2, 128, 16, dtype, seed=6)
    out = triton_ops.paged_attention(q, k_cache, v_cache, md, 128 ** -0.5, **kw)
    assert_attention_close(out, q, k_cache, v_cache, md, 128 ** -0.5)


@pytest.mark.slow
def test_long_prefill_then_decodes():
    """A 300-token prompt in chunks (chunked prefill) then decode steps, checked at every step."""
    block_size, prompt, chunk = 16, 300, 112
    steps = [(start, min(chunk, prompt - start)) for start in range(0, prompt, chunk)]
    steps += [(prompt + i, 1) for i in range(3)]
    for i, (prefix, new) in enumerate(steps):
        q, k_cache, v_cache, md = make_paged_batch([(prefix, new), (7, new)], 8, 1, 128, block_size,
                                                   torch.float32, seed=10 + i)
        out = triton_ops.paged_attention(q, k_cache, v_cache, md, 128 ** -0.5,
                                         split_size=64, block_m=32, block_n=32)
        assert_attention_close(out, q, k_cache, v_cache, md, 128 ** -0.5)


# ------------------------------------------------------------------------------------------------
# rms_norm
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hidden", [64, 100])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype, hidden, with_residual):
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(2, 5, hidden, generator=gen) * 3).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype)
    residual = torch.randn(2, 5, hidden, generator=gen).to(dtype) if with_residual else None
    args = (x, weight, 1e-5) + ((residual,) if with_residual else ())
    ref = reference.rms_norm(*args)
    with NoHostSync():
        ours = triton_ops.rms_norm(*(a.to(DEVICE) if torch.is_tensor(a) else a for a in args))
    if not with_residual:
        ref, ours = (ref,), (ours,)
    assert len(ours) == len(ref)
    for got, want in zip(ours, ref):
        assert got.dtype == want.dtype and got.shape == want.shape
        tol = ULP[dtype] * 2
        torch.testing.assert_close(got.cpu().float(), want.float(), atol=tol, rtol=tol)
    if with_residual and (dtype != torch.bfloat16 or DEVICE == "cuda"):
        assert torch.equal(ours[1].cpu(), ref[1])  # a plain add, rounded once: exact


# ------------------------------------------------------------------------------------------------
# rotary_embedding
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim,rot_dim", [(64, 64), (128, 128), (128, 64), (80, 80)])
def test_rotary_embedding(dtype, head_dim, rot_dim):
    gen = torch.Generator().manual_seed(8)
    num_tokens, num_heads, num_kv_heads, max_pos = 9, 6, 2, 512
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2).float() / rot_dim))
    freqs = torch.outer(torch.arange(max_pos).float(), inv_freq)
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), -1)
    positions = torch.randint(0, max_pos, (num_tokens,), generator=gen)
    # q and k as views into one fused projection, as the model hands them over
    qkv = torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, generator=gen).to(dtype)
    q, k = qkv[:, :num_heads], qkv[:, num_heads:num_heads + num_kv_heads]
    ref = reference.rotary_embedding(q, k, positions, cos_sin)
    with NoHostSync():
        ours = triton_ops.rotary_embedding(q.to(DEVICE), k.to(DEVICE), positions.to(DEVICE), cos_sin.to(DEVICE))
    for got, want in zip(ours, ref):
        assert got.dtype == want.dtype and got.shape == want.shape
        tol = ULP[dtype] * (2 if dtype == torch.bfloat16 else 1)
        torch.testing.assert_close(got.cpu().float(), want.float(), atol=tol, rtol=tol)
    if rot_dim < head_dim:
        assert torch.equal(ours[0][..., rot_dim:].cpu(), q[..., rot_dim:])
    assert torch.equal(qkv[:, :num_heads], q)  # inputs untouched, like the reference


# ------------------------------------------------------------------------------------------------
# the real compiler
# ------------------------------------------------------------------------------------------------

COMPILE_SCRIPT = textwrap.dedent("""
    import os
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from lamina.kernels import triton_ops as T

    def build(kernel, ptrs, constexprs, floats=(), arch=90, **options):
        sig = {n: "constexpr" if n in constexprs else ptrs.get(n, "fp32" if n in floats else "i32")
               for n in kernel.arg_names}
        # what the JIT specialises on a GPU: 16-byte aligned pointers, strides divisible by 16
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
                 if n not in constexprs and (sig[n].startswith("*") or n.startswith("stride"))}
        out = triton.compile(ASTSource(kernel, sig, constexprs, attrs),
                             target=GPUTarget("cuda", arch, 32), options=options)
        assert out.asm["cubin"], kernel.__name__

    def attn_ptrs(dt):
        p = {n: dt for n in ("q_ptr", "k_cache_ptr", "v_cache_ptr", "out_ptr")}
        p.update(query_start_loc_ptr="*i32", seq_lens_ptr="*i32", block_tables_ptr="*i32",
                 part_out_ptr="*fp32", part_lse_ptr="*fp32")
        return p

    for arch, dt, torch_dt, group in ((90, "*bf16", "bfloat16", 8), (80, "*fp16", "float16", 3),
                                      (90, "*fp32", "float32", 1)):
        import torch
        cfg = T._attention_launch_config(getattr(torch, torch_dt), 128)
        common = dict(GROUP=group, BLOCK_SIZE=16, HEAD_DIM=128, BLOCK_N=64 if dt != "*fp32" else 32,
                      BLOCK_D=128, DOT_PRECISION=T._dot_precision(getattr(torch, torch_dt)), WIDEN_DOT=False)
        build(T._prefill_attention_kernel, attn_ptrs(dt), dict(common, BLOCK_M=64), ("qk_scale",), arch, **cfg)
        build(T._decode_attention_kernel, attn_ptrs(dt), dict(common, BLOCK_H=16, SINGLE_SPLIT=False),
              ("qk_scale",), arch, **cfg)
    build(T._decode_reduce_kernel, attn_ptrs("*bf16"), dict(HEAD_DIM=128, BLOCK_D=128, SPLITS_PER_STEP=16))
    build(T._store_kv_cache_kernel, dict(k_ptr="*bf16", v_ptr="*bf16", k_cache_ptr="*bf16",
          v_cache_ptr="*bf16", slot_mapping_ptr="*i64"), dict(BLOCK_SIZE=16, HEAD_DIM=128, BLOCK_H=8, BLOCK_D=128))
    build(T._rms_norm_kernel, {n: "*bf16" for n in ("x_ptr", "residual_ptr", "weight_ptr", "out_ptr",
          "new_residual_ptr")}, dict(HAS_RESIDUAL=True, BLOCK=4096), ("eps",), num_warps=8)
    build(T._rotary_kernel, dict(q_ptr="*bf16", k_ptr="*bf16", q_out_ptr="*bf16", k_out_ptr="*bf16",
          positions_ptr="*i64", cos_sin_ptr="*fp32"),
          dict(HEAD_DIM=128, ROT_HALF=32, BLOCK_HQ=32, BLOCK_HK=8, BLOCK_HALF=32, BLOCK_TAIL=64))
    print("compiled")
""")


@pytest.mark.slow
def test_kernels_compile_for_gpu():
    """Every kernel builds to a cubin for sm_90 / sm_80 with the real Triton compiler (no GPU
    needed): the interpreter alone accepts code that the compiler would reject."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-4000:]
