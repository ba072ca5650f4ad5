"""CPU decode-attention benchmark: lamina's paged decode attention (cpu_ops.cpp) on a batch of
sequences, with their cache blocks laid out as a busy engine leaves them (shuffled over the cache)
and, for contrast, one after the other. Each cell is the median over --rounds calls, in ms, and the
GB/s of K/V it read: the op reads each cached byte once, so that column against the machine's
measured read bandwidth (`python bench/run.py --only machine`) says how far it is from the memory
roofline. Beside it a yardstick with no arithmetic: torch's `index_select` gathering the same
blocks by the same block tables (it reads them once and writes a copy, so it moves twice the bytes;
its GB/s counts the bytes read).

    python bench/cpu_attention.py                           # SmolLM2-135M heads, 256 x 310 tokens
    python bench/cpu_attention.py --seqs 1,32,256 --len 310,2000 --threads 1,2
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import median_seconds  # noqa: E402
from lamina.kernels import cpu_build  # noqa: E402


def median_ms(fn, rounds: int) -> float:
    return 1e3 * median_seconds(fn, rounds)


def case(seqs: int, length: int, heads: int, kv_heads: int, head_dim: int, block_size: int, shuffled: bool,
         rounds: int) -> dict:
    g = torch.Generator().manual_seed(0)
    per_seq = (length + block_size - 1) // block_size
    num_blocks = seqs * per_seq
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).bfloat16()
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).bfloat16()
    q = torch.randn(seqs, heads, head_dim, generator=g).bfloat16()
    order = torch.randperm(num_blocks, generator=g) if shuffled else torch.arange(num_blocks)
    block_tables = order.int().view(seqs, per_seq)
    seq_lens = torch.full((seqs,), length, dtype=torch.int32)
    scale = head_dim ** -0.5
    op = torch.ops.lamina.paged_decode_attention
    ms = median_ms(lambda: op(q, k_cache, v_cache, block_tables, seq_lens, scale), rounds)
    flat = block_tables.flatten().long()
    k_copy, v_copy = torch.empty_like(k_cache), torch.empty_like(v_cache)  # written in place: no page faults
    read_ms = median_ms(lambda: (torch.index_select(k_cache, 0, flat, out=k_copy),
                                 torch.index_select(v_cache, 0, flat, out=v_copy)), rounds)
    kv_bytes = 2 * seqs * length * kv_heads * head_dim * 2
    return {"ms": ms, "gbs": kv_bytes / ms / 1e6, "read_ms": read_ms, "read_gbs": kv_bytes / read_ms / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", default="256", help="comma-separated batch sizes")
    ap.add_argument("--len", default="310", help="comma-separated cached tokens per sequence")
    ap.add_argument("--threads", default="2", help="comma-separated thread counts")
    ap.add_argument("--heads", default="9,3,64", help="query heads, KV heads, head_dim (SmolLM2-135M's)")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    if not cpu_build.load():
        sys.exit("lamina's CPU kernels could not be built here (see the warning above)")
    heads, kv_heads, head_dim = map(int, args.heads.split(","))
    print(f"torch {torch.__version__}; {heads} query heads, {kv_heads} KV heads, head_dim {head_dim}, "
          f"block size {args.block_size}, bf16 cache; median of {args.rounds}")
    print(f"{'threads':>7} {'seqs':>5} {'len':>6} {'blocks':>9} {'attention ms':>13} {'KV GB/s':>8} "
          f"{'gather ms':>10} {'gather GB/s':>12}")
    for threads in map(int, args.threads.split(",")):
        torch.set_num_threads(threads)
        for seqs in map(int, args.seqs.split(",")):
            for length in map(int, args.len.split(",")):
                for shuffled in (True, False):
                    r = case(seqs, length, heads, kv_heads, head_dim, args.block_size, shuffled, args.rounds)
                    print(f"{threads:>7} {seqs:>5} {length:>6} {'shuffled' if shuffled else 'in order':>9} "
                          f"{r['ms']:>13.3f} {r['gbs']:>8.1f} {r['read_ms']:>10.3f} {r['read_gbs']:>12.1f}")


if __name__ == "__main__":
    main()
