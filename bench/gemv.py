"""CPU GEMV/GEMM benchmark: lamina's C++ kernels (cpu_ops.cpp, cpu_quant.cpp) against torch's ops on
the same weights, for a model's layer shapes, per row count (decode batch sizes, up to prefill).

- bf16 lamina: torch.ops.lamina.bf16_packed_linear on the weight packed once by layers.linear.pack_bf16;
  bf16 torch: nn.functional.linear on the [N, K] weight (oneDNN; on AMX where the OS grants it).
- int8 lamina: torch.ops.lamina.int8_packed_linear (layers.quant.pack_int8); int8 torch:
  torch._weight_int8pack_mm; int8 dequant+bf16: dequantize the weight, then torch's bf16 matmul.
- int4 lamina: torch.ops.lamina.int4_packed_linear (layers.quant.pack_int4, Q4_1's grid); int4 torch:
  torch's own packed int4 kernel (_weight_int4pack_mm_for_cpu) on the same codes; int4
  dequant+bf16 as for int8.
The engine picks among these per row class by measuring them at start (kernels/dispatch.py); this
table is the full sweep. First, this machine's limits: torch's bf16 and int8 matmul peaks (a large
square product, through oneDNN, so on AMX where granted) and the memory read bandwidth; after each
shape, lamina's bf16 GEMM as a fraction of them (prefill rows against the peak, one row against
the bandwidth).

Each case runs over `--layers` copies of the weight, so the weights come from memory as they do in a
real decode step, not from the cache. A/B rounds alternate the ops, and each cell is the median of
--rounds rounds (these machines are noisy). Above 64 rows the ops are compute-bound, and a case
runs over proportionally fewer copies (at least 2), which keeps prefill row counts cheap. Each cell
is microseconds per call and, in brackets, the GB/s of weight bytes read (compute-bound row counts
read the weights far below memory bandwidth: there it just restates the time).

    python bench/gemv.py                                  # SmolLM2-135M shapes, 2 threads
    python bench/gemv.py --rows 1,4,16,32 --threads 4 --shape 576x3072
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import median  # noqa: E402  (also puts the repository on sys.path)
from lamina.kernels import cpu_build  # noqa: E402
from lamina.engine.profiler import measure_peaks  # noqa: E402
from lamina.layers.linear import pack_bf16  # noqa: E402
from lamina.layers.quant import pack_int4, pack_int8, quantize_int4  # noqa: E402

# Above this many rows the ops are compute-bound, and each row count runs over proportionally fewer
# weight copies (at least 2), so prefill row counts take about as long as this one
FULL_COPIES_MAX_ROWS = 64


def candidates(weight: torch.Tensor) -> dict:
    """name -> (bytes read per call, op(x)) for one bf16 weight [N, K]."""
    w = weight.float()
    scale = w.abs().amax(1).clamp(min=1e-8) / 127
    w8 = torch.round(w / scale[:, None]).to(torch.int8)
    scale_bf16 = scale.bfloat16()
    packed, packed8 = pack_bf16(weight), pack_int8(w8)
    n, k = weight.shape
    codes, d, lo = quantize_int4(weight, 32)
    packed4 = pack_int4(codes, d, lo)
    # torch's int4 layout computes (code - 8) * scale + zero, from [K/32, N, 2] scale|zero pairs
    torch4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    scale_zero = torch.stack([d, lo + 8 * d], -1).transpose(0, 1).contiguous().bfloat16()
    w4 = (codes.view(n, -1, 32) * d[..., None] + lo[..., None]).view(n, k)
    int4_bytes = n * k // 2 + n * k // 32 * 4
    return {
        "bf16 lamina": (2 * n * k, lambda x: torch.ops.lamina.bf16_packed_linear(x, packed)),
        "bf16 torch": (2 * n * k, lambda x: nn.functional.linear(x, weight)),
        "int8 lamina": (n * k, lambda x: torch.ops.lamina.int8_packed_linear(x, packed8, scale)),
        "int8 torch": (n * k, lambda x: torch._weight_int8pack_mm(x, w8, scale_bf16)),
        "int8 dequant+bf16": (n * k, lambda x: nn.functional.linear(x, w8.to(x.dtype) * scale_bf16[:, None])),
        "int4 lamina": (int4_bytes, lambda x: torch.ops.lamina.int4_packed_linear(x, packed4)),
        "int4 torch": (int4_bytes, lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, torch4, 32, scale_zero)),
        "int4 dequant+bf16": (int4_bytes, lambda x: nn.functional.linear(x, w4.to(x.dtype))),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", action="append", help="KxN (input x output features); default: SmolLM2-135M's")
    ap.add_argument("--rows", default="1,2,4,8,16,32,64,128,256,512")
    ap.add_argument("--layers", type=int, default=16, help="weight copies per case (defeats the caches)")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if not cpu_build.load():
        print("lamina's CPU kernels are unavailable here (no C++ compiler?): nothing to compare")
        return 0
    torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shape or ["576x960", "576x576", "576x3072", "1536x576"]]
    for k, n in shapes:
        if n % 64 or k % 32:
            ap.error(f"--shape {k}x{n}: the packed kernels take N a multiple of 16 (torch's int4: 64) and K of 32")
    from lamina.env import cpu_model
    from lamina.cpu_features import amx
    limits = measure_peaks(rounds=args.rounds)
    print(f"CPU {cpu_model()}, AMX {'granted' if amx().granted else 'no'} ({amx().reason}), threads {args.threads}, "
          f"torch {torch.__version__}")
    print(f"limits: bf16 GFLOP/s {limits['matmul_bf16_gflops']:.0f}, int8 GOP/s {limits.get('matmul_int8_gops', 0):.0f}, "
          f"read GB/s {limits['read_gbps']:.0f}")
    print(f"weight copies per case: {args.layers} (fewer above {FULL_COPIES_MAX_ROWS} rows); us per call (GB/s of weights)")
    for k, n in shapes:
        copies = [candidates(torch.randn(n, k).bfloat16() * 0.02) for _ in range(args.layers)]
        names = list(copies[0])
        print(f"\n{k} -> {n}")
        print("rows  " + "  ".join(f"{name:>20}" for name in names))
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randn(m, k).bfloat16()
            # compute-bound from here on: fewer copies keep the work per cell about constant
            used = copies[:max(2, len(copies) * FULL_COPIES_MAX_ROWS // m)] if m > FULL_COPIES_MAX_ROWS else copies
            times = {name: [] for name in names}
            for _ in range(args.rounds):
                for name in names:
                    start = time.perf_counter()
                    for c in used:
                        c[name][1](x)
                    times[name].append((time.perf_counter() - start) / len(used))
            cells = []
            for name in names:
                t = median(times[name])
                cells.append(f"{t * 1e6:.1f} ({copies[0][name][0] / t / 1e9:.1f})")
            print(f"{m:4d}  " + "  ".join(f"{c:>20}" for c in cells), flush=True)
            lamina = median(times["bf16 lamina"])
            if m == 1:
                gbs = 2 * n * k / lamina / 1e9
                print(f"      -> bf16 lamina at 1 row: {gbs:.1f} GB/s, {gbs / limits['read_gbps']:.0%} of the read bandwidth")
            elif m == max(int(r) for r in args.rows.split(",")):
                gflops = 2 * m * n * k / lamina / 1e9
                print(f"      -> bf16 lamina at {m} rows: {gflops:.0f} GFLOP/s, "
                      f"{gflops / limits['matmul_bf16_gflops']:.0%} of torch's bf16 peak")
    return 0


if __name__ == "__main__":
    sys.exit(main())
