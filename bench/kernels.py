"""Kernel benchmarks: lamina's Triton ops against torch on the same data (needs a CUDA GPU).

For each case it prints the time, the achieved memory bandwidth (GB/s: the bytes the op must at
least read and write, over its time) and, for attention, the speed-up against the best of torch's
`scaled_dot_product_attention` on the same K/V laid out densely per sequence (the ideal a paged
kernel competes with: SDPA needs no block table) and against lamina's torch reference op (which
gathers the paged cache first). Times are medians of `triton.testing.do_bench` (eager calls, each
paying Python's and the launch's overhead), and for decode also of `do_bench_cudagraph` (the same
call replayed from a CUDA graph, as lamina's decode steps run: the kernels' own time).

    python bench/kernels.py                            # all sections, Llama-3-8B attention shape, bf16
    python bench/kernels.py --only decode --kv-heads 8 --heads 32 --head-dim 128
    python bench/kernels.py --max-gb 20                # memory the decode cases may use

Without CUDA it prints a note and exits 0. `--smoke` runs a few tiny cases on the CPU under the
Triton interpreter, to check this script itself (the numbers mean nothing there).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lamina.kernels import AttentionMetadata, reference  # noqa: E402

DECODE_BATCHES = [1, 4, 16, 64, 256]
DECODE_CONTEXTS = [128, 512, 2048, 8192, 32768]
PREFILL_CASES = [(1, 0, 512), (1, 0, 2048), (1, 0, 8192), (4, 0, 2048), (8, 0, 1024),
                 (1, 4096, 512), (4, 8192, 512)]  # (batch, cached prefix, new tokens)
OPS_TOKENS = [1, 16, 256, 4096, 16384]


def timeit(fn) -> float:
    """Seconds per call."""
    if torch.cuda.is_available():
        import triton.testing
        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e-3
    fn()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def timeit_graph(fn) -> float | None:
    """Seconds per call replayed from a CUDA graph: the kernels' own time, without the Python and
    launch overhead that an eager call pays (and lamina's decode steps, which replay graphs, don't)."""
    if not torch.cuda.is_available():
        return None
    import triton.testing
    return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e-3


def fmt_row(cells, widths):
    return "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))


def print_table(title, header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print(f"\n{title}")
    print(fmt_row(header, widths))
    print(fmt_row(["-" * w for w in widths], widths))
    for r in rows:
        print(fmt_row(r, widths))


def max_error(ours, ref) -> float:
    """Largest |difference| from the torch reference op: a sanity check of the compiled kernels."""
    return (ours.float() - ref.float()).abs().max().item()


def paged_batch(batch, prefix, new, args, device):
    """Random K/V for `batch` sequences of prefix+new tokens in a paged cache whose blocks are
    handed out in random order; also the same K/V dense, [batch, kv_heads, length, head_dim]."""
    length, bs = prefix + new, args.block_size
    blocks_per_seq = -(-length // bs)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, bs, args.kv_heads, args.head_dim)
    k_cache = torch.randn(shape, dtype=args.dtype, device=device)
    v_cache = torch.randn(shape, dtype=args.dtype, device=device)
    tables = torch.randperm(num_blocks, device=device).to(torch.int32).view(batch, blocks_per_seq)
    q = torch.randn(batch * new, args.heads, args.head_dim, dtype=args.dtype, device=device)
    md = AttentionMetadata(
        query_start_loc=torch.arange(0, batch * new + 1, new, dtype=torch.int32, device=device),
        seq_lens=torch.full((batch,), length, dtype=torch.int32, device=device),
        block_tables=tables,
        slot_mapping=torch.empty(0, dtype=torch.int64, device=device),  # unused by attention
        max_query_len=new, max_seq_len=length)

    def dense(cache):
        return cache[tables.long()].flatten(1, 2)[:, :length].transpose(1, 2).contiguous()
    return q, k_cache, v_cache, md, dense(k_cache), dense(v_cache)


def sdpa_best(q_dense, k_dense, v_dense, scale, prefix, expand=True):
    """The faster of SDPA with native GQA and (if `expand`) SDPA on K/V pre-expanded to every
    query head: where a fused kernel lacks GQA, the first falls back to the math path."""
    group = q_dense.shape[1] // k_dense.shape[1]
    new, length = q_dense.shape[2], k_dense.shape[2]
    if new == 1:
        mask = None
    elif prefix == 0:
        mask = "causal"
    else:
        from torch.nn.attention.bias import causal_lower_right
        mask = causal_lower_right(new, length)
    variants = [(k_dense, v_dense, True)]
    if expand and group > 1:
        variants.append((k_dense.repeat_interleave(group, 1), v_dense.repeat_interleave(group, 1), False))

    def run(k, v, gqa):
        if mask == "causal":
            return F.scaled_dot_product_attention(q_dense, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q_dense, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    best = float("inf")
    for k, v, gqa in variants:
        try:
            best = min(best, timeit(lambda: run(k, v, gqa)))
        except (RuntimeError, ValueError, NotImplementedError):  # a combination torch rejects
            pass
    return best


def bench_decode(ops, args, device):
    rows = []
    esize = torch.finfo(args.dtype).bits // 8
    scale = args.head_dim ** -0.5
    for batch in args.decode_batches:
        for ctx in args.decode_contexts:
            kv_bytes = 2 * batch * ctx * args.kv_heads * args.head_dim * esize
            budget = args.max_gb * 1e9
            if 3 * kv_bytes > budget:  # the paged cache, its dense copy, the reference's gather
                continue
            q, k_cache, v_cache, md, k_dense, v_dense = paged_batch(batch, ctx - 1, 1, args, device)
            moved = kv_bytes + 2 * q.numel() * esize
            t_tri = timeit(lambda: ops.paged_attention(q, k_cache, v_cache, md, scale))
            t_graph = timeit_graph(lambda: ops.paged_attention(q, k_cache, v_cache, md, scale))
            t_ref = timeit(lambda: reference.paged_attention(q, k_cache, v_cache, md, scale))
            err = max_error(ops.paged_attention(q, k_cache, v_cache, md, scale),
                            reference.paged_attention(q, k_cache, v_cache, md, scale))
            group = args.heads // args.kv_heads
            t_sdpa = sdpa_best(q.view(batch, 1, args.heads, -1).transpose(1, 2), k_dense, v_dense, scale,
                               ctx - 1, expand=(2 + group) * kv_bytes <= budget)
            rows.append([batch, ctx, f"{t_tri * 1e6:.1f}", f"{moved / t_tri / 1e9:.0f}",
                         "-" if t_graph is None else f"{t_graph * 1e6:.1f}",
                         "-" if t_graph is None else f"{moved / t_graph / 1e9:.0f}",
                         f"{t_sdpa * 1e6:.1f}", f"{moved / t_sdpa / 1e9:.0f}", f"{t_sdpa / t_tri:.2f}x",
                         f"{t_ref / t_tri:.2f}x", f"{err:.1e}"])
            del q, k_cache, v_cache, md, k_dense, v_dense
            if device == "cuda":
                torch.cuda.empty_cache()
    print_table(f"decode attention ({args.heads}/{args.kv_heads} heads, head_dim {args.head_dim}, "
                f"block {args.block_size}, {args.dtype_name})",
                ["batch", "ctx", "triton us", "GB/s", "in graph us", "GB/s", "sdpa us", "GB/s", "vs sdpa", "vs torch ref", "max err"], rows)


def bench_prefill(ops, args, device):
    rows = []
    scale = args.head_dim ** -0.5
    for batch, prefix, new in args.prefill_cases:
        q, k_cache, v_cache, md, k_dense, v_dense = paged_batch(batch, prefix, new, args, device)
        # causal: each new token sees the prefix and half the new tokens on average
        flops = 4 * batch * args.heads * args.head_dim * new * (prefix + (new + 1) / 2)
        t_tri = timeit(lambda: ops.paged_attention(q, k_cache, v_cache, md, scale))
        err = max_error(ops.paged_attention(q, k_cache, v_cache, md, scale),
                        reference.paged_attention(q, k_cache, v_cache, md, scale))
        q_dense = q.view(batch, new, args.heads, -1).transpose(1, 2)
        t_sdpa = sdpa_best(q_dense, k_dense, v_dense, scale, prefix)
        rows.append([batch, prefix, new, f"{t_tri * 1e3:.3f}", f"{flops / t_tri / 1e12:.1f}",
                     f"{t_sdpa * 1e3:.3f}", f"{flops / t_sdpa / 1e12:.1f}", f"{t_sdpa / t_tri:.2f}x", f"{err:.1e}"])
        del q, k_cache, v_cache, md, k_dense, v_dense
    print_table(f"prefill / extend attention ({args.heads}/{args.kv_heads} heads, head_dim {args.head_dim}, "
                f"{args.dtype_name})",
                ["batch", "prefix", "new", "triton ms", "TFLOP/s", "sdpa ms", "TFLOP/s", "vs sdpa", "max err"], rows)


def bench_small_ops(ops, args, device):
    rows = []
    dt, esize = args.dtype, torch.finfo(args.dtype).bits // 8
    hidden, D = args.hidden, args.head_dim
    rot = torch.randn(args.max_pos, D, dtype=torch.float32, device=device)
    for tokens in args.ops_tokens:
        x = torch.randn(tokens, hidden, dtype=dt, device=device)
        res = torch.randn_like(x)
        w = torch.randn(hidden, dtype=dt, device=device)
        cases = {"rms_norm+residual": ((x, w, 1e-6, res), 4 * x.numel() * esize)}
        q = torch.randn(tokens, args.heads, D, dtype=dt, device=device)
        k = torch.randn(tokens, args.kv_heads, D, dtype=dt, device=device)
        pos = torch.randint(0, args.max_pos, (tokens,), device=device)
        cases["rotary_embedding"] = ((q, k, pos, rot), 2 * (q.numel() + k.numel()) * esize + tokens * D * 4)
        num_blocks = -(-tokens // args.block_size) + 1
        cache_shape = (num_blocks, args.block_size, args.kv_heads, D)
        kc, vc = torch.zeros(cache_shape, dtype=dt, device=device), torch.zeros(cache_shape, dtype=dt, device=device)
        slots = torch.randperm(num_blocks * args.block_size, device=device)[:tokens]
        cases["store_kv_cache"] = ((k, k.clone(), kc, vc, slots), 4 * k.numel() * esize)
        for name, (op_args, moved) in cases.items():
            t_tri = timeit(lambda: getattr(ops, name.split("+")[0])(*op_args))
            t_ref = timeit(lambda: getattr(reference, name.split("+")[0])(*op_args))
            rows.append([name, tokens, f"{t_tri * 1e6:.1f}", f"{moved / t_tri / 1e9:.0f}",
                         f"{t_ref * 1e6:.1f}", f"{moved / t_ref / 1e9:.0f}", f"{t_ref / t_tri:.2f}x"])
    rows.sort(key=lambda r: r[0])
    print_table(f"small ops (hidden {hidden}, {args.heads}/{args.kv_heads} heads, {args.dtype_name})",
                ["op", "tokens", "triton us", "GB/s", "torch us", "GB/s", "speed-up"], rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["decode", "prefill", "ops"], action="append")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--max-gb", type=float, default=None,
                   help="GPU memory the decode cases may use (default: 80%% of what is free)")
    p.add_argument("--smoke", action="store_true", help="tiny cases on the CPU under the Triton interpreter")
    args = p.parse_args(argv)
    args.dtype_name, args.dtype = args.dtype, getattr(torch, args.dtype)
    args.max_pos = 65536
    args.decode_batches, args.decode_contexts = DECODE_BATCHES, DECODE_CONTEXTS
    args.prefill_cases, args.ops_tokens = PREFILL_CASES, OPS_TOKENS
    if args.smoke:
        device = "cpu"
        args.heads, args.kv_heads, args.head_dim, args.hidden, args.max_pos = 4, 2, 32, 64, 256
        args.decode_batches, args.decode_contexts = [1, 3], [20, 70]
        args.prefill_cases, args.ops_tokens = [(2, 0, 20), (1, 30, 9)], [1, 7]
        args.max_gb = 1.0
    elif not torch.cuda.is_available():
        print("bench/kernels.py: no CUDA GPU here; the Triton kernels are benchmarked on a GPU only "
              "(tests/kernels checks them for correctness under the interpreter). Nothing to do.")
        return 0
    else:
        device = "cuda"
        if args.max_gb is None:
            args.max_gb = 0.8 * torch.cuda.mem_get_info()[0] / 1e9
        print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    from lamina.kernels import triton_ops as ops
    sections = args.only or ["decode", "prefill", "ops"]
    torch.manual_seed(0)
    with torch.inference_mode():
        if "decode" in sections:
            bench_decode(ops, args, device)
        if "prefill" in sections:
            bench_prefill(ops, args, device)
        if "ops" in sections:
            bench_small_ops(ops, args, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
