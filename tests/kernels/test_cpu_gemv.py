"""lamina's C++ CPU matmuls against plain torch on the same inputs: the bf16 GEMM on packed weights
(cpu_ops.cpp), the int8 and int4 kernels on packed weights (cpu_quant.cpp), and the modules of
lamina/layers/ that call them.

The build on this machine takes the AVX-512 paths where the CPU has them; a second build for a
baseline x86-64 CPU covers the plain C++ paths that other machines run.
"""
import platform

import pytest
import torch
from torch import nn

from lamina.kernels import cpu_build
from lamina.kernels.dispatch import KernelPlan, RowPlan
from lamina.layers import build_linears
from lamina.layers.linear import Bf16Linear, Bf16SwiGLU, pack_bf16, pack_bf16_swiglu
from lamina.layers.quant import Int4Linear, Int8Linear, pack_int4, pack_int8, quantize_int4, unpack_int4, unpack_int8


def use_cpu_gemm(model: nn.Module) -> int:
    """The bf16 layers of `model` built as an engine builds them, with the default plan (lamina's
    kernels where they take the layer); how many were replaced."""
    return build_linears(model, None, KernelPlan(), torch.device("cpu"))

pytestmark = pytest.mark.usefixtures("cpu_kernels")  # skips only where no build is expected (conftest.py)

# (M, K, N). bf16_packed_linear tiles 8 rows x 3 blocks of 16 columns, in chunks of 128 rows:
# M covers one row, the 1..7-row remainder tiles and a second (partial) chunk; N covers strips of
# 1, 2 and 3 blocks (16, 32, 80 = one strip of 3 and one of 2); K a small model's sizes and a
# tiny one.
BF16_SHAPES = [(1, 576, 960), (3, 576, 48), (8, 1536, 80), (13, 64, 32), (130, 576, 16), (5, 2, 64),
               (1, 1536, 16), (2, 64, 128)]
# (M, K, I) for bf16_packed_swiglu: tiles of 6 rows x (2 gate + 2 up blocks), chunks of 128 rows:
# M covers one row, the 1..5-row remainders, a second chunk; I one and several strips of 32 channels
SWIGLU_SHAPES = [(1, 576, 1536), (5, 64, 32), (6, 128, 64), (13, 576, 96), (131, 64, 64), (2, 1536, 32)]
# int8/int4: tiles of up to 8 quantized rows (4 of x when split) x 4 blocks of 16 columns (1 block
# from 4 rows): M covers 1..3 rows, 4+, and a second tile; N 1, 2, 3, 4 and 60 blocks
QUANT_SHAPES = [(1, 576, 960), (3, 576, 64), (5, 1536, 576), (2, 96, 16), (16, 64, 32), (9, 64, 48), (4, 32, 16)]


def _check_bf16(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor):
    """got must be float32 sums of the bf16 products, rounded to bf16 once: within half a bf16
    ulp (2^-8 relative) of the float32 result, plus float32's own rounding over K."""
    ref = x.float() @ w.float().T
    assert got.dtype == torch.bfloat16 and got.shape == ref.shape
    k = x.shape[1]
    atol = 4 * k * 2 ** -24 * (x.float().abs() @ w.float().abs().T).max().item()
    torch.testing.assert_close(got.float(), ref, rtol=2 ** -8, atol=atol)


def _check_ops(ns: str):
    ops = getattr(torch.ops, ns)
    for m, k, n in BF16_SHAPES:
        torch.manual_seed(m * k + n)
        x = torch.randn(m, k).to(torch.bfloat16)
        w = torch.randn(n, k).to(torch.bfloat16)
        _check_bf16(ops.bf16_packed_linear(x, pack_bf16(w)), x, w)
    # a strided x (every other column of a wider one) is read as its values, not its storage
    torch.manual_seed(7)
    wide, w = torch.randn(11, 192).to(torch.bfloat16), torch.randn(32, 96).to(torch.bfloat16)
    _check_bf16(ops.bf16_packed_linear(wide[:, ::2], pack_bf16(w)), wide[:, ::2], w)
    for m, k, i in SWIGLU_SHAPES:
        torch.manual_seed(m + k + i)
        x = torch.randn(m, k).to(torch.bfloat16)
        w = (torch.randn(2 * i, k) * 2 / k ** 0.5).to(torch.bfloat16)   # gates on both sides of 0
        _check_swiglu(ops, x, w)

    for m, k, n in QUANT_SHAPES:
        torch.manual_seed(m * k + n)
        x = torch.randn(m, k)
        x[0, :32] *= 50  # one group much larger than the rest: per-group activation scales matter
        q8 = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        scale = torch.rand(n) * 0.01 + 1e-3
        w8 = q8.float() * scale[:, None]
        codes, d, lo = quantize_int4(torch.randn(n, k), 32)
        w4 = (codes.view(n, -1, 32).float() * d.bfloat16().float()[..., None]
              + lo.bfloat16().float()[..., None]).view(n, k)
        for split in (True, False):
            for dtype in (torch.float32, torch.bfloat16):
                xd = x.to(dtype)
                _check_quant(ops.int8_packed_linear(xd, pack_int8(q8), scale, split), xd, w8, split)
                _check_quant(ops.int4_packed_linear(xd, pack_int4(codes, d, lo), split), xd, w4, split)


def _check_swiglu(ops, x: torch.Tensor, w: torch.Tensor):
    """bf16_packed_swiglu(x, [gate; up]) is silu_and_mul of bf16_packed_linear's product bit for bit
    (gate and up rounded to bf16, silu rounded, then the product), and near float32's SwiGLU."""
    got = ops.bf16_packed_swiglu(x, pack_bf16_swiglu(w))
    two_ops = ops.silu_and_mul(ops.bf16_packed_linear(x, pack_bf16(w)))
    assert got.dtype == torch.bfloat16 and got.shape == (x.shape[0], w.shape[0] // 2)
    assert torch.equal(got, two_ops)
    gate, up = (x.float() @ w.float().T).chunk(2, dim=-1)
    ref = nn.functional.silu(gate) * up
    torch.testing.assert_close(got.float(), ref, rtol=2 ** -6, atol=2 ** -7 * ref.abs().max().item())


def _check_quant(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, split: bool):
    """x is rounded to int8 per row and group of 32 (scale dx = max|x| / 127), or with split to two
    int8 parts (the remainder's scale <= dx / 254): each output is off by at most the rounding,
    sum over groups of dx / 2 * sum |w|, plus float32's rounding; bf16 output adds half an ulp."""
    xf = x.float()
    ref = xf @ w.T
    assert got.dtype == x.dtype and got.shape == ref.shape
    m, k = xf.shape
    dx = xf.view(m, k // 32, 32).abs().amax(-1) / 127 / (254 if split else 1)   # [M, G]
    w_abs = w.abs().view(w.shape[0], k // 32, 32).sum(-1)                        # [N, G]
    bound = dx / 2 @ w_abs.T + 1e-5 * (xf.abs() @ w.abs().T)
    if x.dtype == torch.bfloat16:
        bound = bound + 2 ** -8 * ref.abs()
    assert ((got.float() - ref).abs() <= bound).all(), ((got.float() - ref).abs() - bound).max()


def test_pack_int8_and_int4_layouts():
    """int8: packed[b, g, 64 j + 4 c + i] = q[16 b + c, 32 g + 4 j + i] + 128. int4: byte 64 j + 4 c + i
    holds codes (16 b + c, 32 g + 4 j + i) low and (..., + 16) high, bytes 256 + 4 c the bf16 scale
    and minimum; both unpack to what they packed."""
    q = torch.randint(-127, 128, (32, 64), dtype=torch.int8)
    p8 = pack_int8(q)
    assert p8.shape == (2, 2, 512) and p8.dtype == torch.uint8
    for b, g, j, c, i in [(0, 0, 0, 0, 0), (1, 1, 7, 15, 3), (0, 1, 2, 5, 1)]:
        assert int(p8[b, g, 64 * j + 4 * c + i]) == int(q[16 * b + c, 32 * g + 4 * j + i]) + 128
    assert torch.equal(unpack_int8(p8), q)
    codes, d, lo = quantize_int4(torch.randn(32, 64), 32)
    p4 = pack_int4(codes, d, lo)
    assert p4.shape == (2, 2, 320)
    for b, g, j, c, i in [(0, 0, 0, 0, 0), (1, 1, 3, 15, 3), (0, 1, 2, 5, 1)]:
        byte = int(p4[b, g, 64 * j + 4 * c + i])
        assert byte & 15 == codes[16 * b + c, 32 * g + 4 * j + i] and byte >> 4 == codes[16 * b + c, 32 * g + 16 + 4 * j + i]
    got_codes, got_d, got_lo = unpack_int4(p4)
    assert torch.equal(got_codes, codes) and torch.equal(got_d, d.bfloat16()) and torch.equal(got_lo, lo.bfloat16())


def test_pack_bf16_layout():
    """packed[b, p, c, i] = w[16 b + c, 2 p + i]."""
    w = torch.arange(32 * 6, dtype=torch.float32).view(32, 6).to(torch.bfloat16)
    packed = pack_bf16(w)
    assert packed.shape == (2, 3, 16, 2) and packed.is_contiguous()
    for b, p, c, i in [(0, 0, 0, 0), (0, 0, 0, 1), (0, 2, 5, 1), (1, 1, 15, 0), (1, 2, 3, 1)]:
        assert packed[b, p, c, i] == w[16 * b + c, 2 * p + i]


def test_pack_bf16_swiglu_layout():
    """Blocks of 16 rows in the order gate 2j, gate 2j+1, up 2j, up 2j+1: per strip of 4 blocks, the
    gate and up rows of the same 32 intermediate channels."""
    i, k = 64, 4
    w = torch.arange(2 * i * k, dtype=torch.float32).view(2 * i, k).to(torch.bfloat16)
    packed = pack_bf16_swiglu(w)
    assert packed.shape == (8, 2, 16, 2)
    gate, up = w[:i].view(4, 16, k), w[i:].view(4, 16, k)
    order = [gate[0], gate[1], up[0], up[1], gate[2], gate[3], up[2], up[3]]
    assert torch.equal(packed, pack_bf16(torch.cat(order)))


def test_swiglu_module_and_use_cpu_gemm():
    """use_cpu_gemm gives an MLP's gate_up_proj the fused module (and only where its channels come in
    whole strips of 32); MLP.forward then skips its own SwiGLU, with the same result."""
    from types import SimpleNamespace
    from lamina.distributed.sharding import Shard
    from lamina.kernels.cpu import CpuOps
    from lamina.models.llama import MLP
    torch.manual_seed(3)
    cfg = SimpleNamespace(hidden_size=64, intermediate_size=96)
    mlp = MLP(cfg, CpuOps(), Shard()).to(torch.bfloat16)
    x = torch.randn(2, 7, 64).to(torch.bfloat16)
    with torch.no_grad():
        before = mlp(x)
        assert use_cpu_gemm(mlp)
        assert isinstance(mlp.gate_up_proj, Bf16SwiGLU) and isinstance(mlp.down_proj, Bf16Linear)
        after = mlp(x)
    assert after.shape == before.shape == (2, 7, 64)
    torch.testing.assert_close(after.float(), before.float(), rtol=2 ** -6, atol=2 ** -7 * before.abs().max().item())
    # 2 x 48 channels: not whole strips of 32, so a plain packed GEMM and the MLP's own SwiGLU
    odd = nn.ModuleDict({"gate_up_proj": nn.Linear(64, 96, bias=False).to(torch.bfloat16)})
    assert not Bf16SwiGLU.fits(odd["gate_up_proj"]) and use_cpu_gemm(odd)
    assert type(odd["gate_up_proj"]) is Bf16Linear


def test_ops_match_torch_on_this_cpu():
    _check_ops("lamina")


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the baseline build targets x86-64")
def test_plain_paths_match_torch():
    """The same source built for an x86-64-v2 CPU (no AVX-512): what other machines run."""
    assert cpu_build.load(namespace="lamina_plain", march="x86-64-v2")
    _check_ops("lamina_plain")


def test_ops_reject_bad_shapes_with_a_clear_error():
    w = torch.zeros(32, 64, dtype=torch.bfloat16)
    packed = pack_bf16(w)
    op = torch.ops.lamina.bf16_packed_linear
    x = torch.zeros(2, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"x must be bfloat16 \[M, 64\]"):
        op(torch.zeros(2, 32, dtype=torch.bfloat16), packed)      # wrong K
    with pytest.raises(RuntimeError, match=r"x must be bfloat16 \[M, 64\]"):
        op(x.float(), packed)                                        # wrong dtype
    with pytest.raises(RuntimeError, match=r"x must be bfloat16 \[M, 64\]"):
        op(x.view(2, 1, 64), packed)                                 # not 2-D
    bad_weights = [w,                                                # not packed
                   packed.float(),                                   # not bf16
                   packed.transpose(0, 1),                           # not contiguous
                   w.view(4, 32, 8, 2)]                              # not 16 columns x 2 channels
    for bad in bad_weights:
        with pytest.raises(RuntimeError, match=r"packed weight must be contiguous bfloat16 \[N/16, K/2, 16, 2\]"):
            op(x, bad)
    with pytest.raises(RuntimeError, match=r"a SwiGLU weight needs 2 x a multiple of 32 output channels, got 32"):
        torch.ops.lamina.bf16_packed_swiglu(x, packed)
    p8 = pack_int8(torch.zeros(32, 64, dtype=torch.int8))
    with pytest.raises(RuntimeError, match=r"packed int8 weight must be contiguous uint8 \[N/16, K/32, 512\]"):
        torch.ops.lamina.int8_packed_linear(torch.zeros(2, 64), p8[..., :320].contiguous(), torch.ones(32))
    with pytest.raises(RuntimeError, match=r"x must be \[M, 64\]"):
        torch.ops.lamina.int8_packed_linear(torch.zeros(2, 32), p8, torch.ones(32))
    with pytest.raises(RuntimeError, match=r"int8 scale must be contiguous float32 \[N\]"):
        torch.ops.lamina.int8_packed_linear(torch.zeros(2, 64), p8, torch.ones(16))
    with pytest.raises(RuntimeError, match=r"packed int4 weight must be contiguous uint8 \[N/16, K/32, 320\]"):
        torch.ops.lamina.int4_packed_linear(torch.zeros(2, 64), p8)


def test_ops_compile_without_graph_breaks():
    """torch.compile traces the ops (their shapes are registered) into one graph."""
    packed = pack_bf16(torch.randn(64, 64).to(torch.bfloat16))
    p8, scale = pack_int8(torch.randint(-127, 128, (32, 64), dtype=torch.int8)), torch.rand(32)
    p4 = pack_int4(*quantize_int4(torch.randn(16, 32), 32))

    swiglu = pack_bf16_swiglu(torch.randn(128, 64).to(torch.bfloat16))

    def f(x):
        y = torch.ops.lamina.bf16_packed_swiglu(x, swiglu)
        y = torch.relu(torch.ops.lamina.bf16_packed_linear(y, packed))
        y = torch.ops.lamina.int8_packed_linear(y, p8, scale) * 2
        return torch.ops.lamina.int4_packed_linear(y, p4)

    x = torch.randn(3, 64).to(torch.bfloat16)
    compiled = torch.compile(f, fullgraph=True)
    out = compiled(x)
    assert out.shape == (3, 16) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out, f(x))


@pytest.mark.parametrize("bias", [True, False])
def test_bf16_linear_module_agrees_for_few_and_many_rows(bias):
    torch.manual_seed(0)
    lin = nn.Linear(128, 80, bias=bias).to(torch.bfloat16)
    assert Bf16Linear.fits(lin)
    mod = Bf16Linear(lin)
    assert set(mod.state_dict()) == ({"packed", "bias"} if bias else {"packed"})  # no bf16 weight kept
    x = torch.randn(2, 150, 128).to(torch.bfloat16)       # 300 rows: more than one 128-row chunk
    ref = nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float() if bias else None)
    # the sums are rounded to bf16 once, and once more after adding the bias
    tol = dict(rtol=2 ** -7, atol=2 ** -8 * ref.abs().max().item())
    for rows in (x[:1, :1], x[:1, :5], x[:, :3], x):      # 1, 5, 6 and 300 rows
        got = mod(rows)
        assert got.dtype == torch.bfloat16 and got.shape == rows.shape[:-1] + (80,)
        torch.testing.assert_close(got.float(), ref[:rows.shape[0], :rows.shape[1]], **tol)
    # float32 inputs go through bf16 and come back as float32
    got = mod(x[0, :4].float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref[0, :4], **tol)


def test_bf16_linear_fits_only_packable_bf16_layers():
    assert Bf16Linear.fits(nn.Linear(64, 32).to(torch.bfloat16))
    assert not Bf16Linear.fits(nn.Linear(64, 40).to(torch.bfloat16))   # 40 % 16 != 0
    assert not Bf16Linear.fits(nn.Linear(63, 32).to(torch.bfloat16))   # odd K
    assert not Bf16Linear.fits(nn.Linear(64, 32))                      # float32
    model = nn.ModuleDict({"odd": nn.Linear(64, 40).to(torch.bfloat16), "fp32": nn.Linear(64, 32),
                           "ok": nn.Linear(64, 32).to(torch.bfloat16)})
    assert use_cpu_gemm(model)
    assert type(model["odd"]) is nn.Linear and type(model["fp32"]) is nn.Linear
    assert isinstance(model["ok"], Bf16Linear)
    # nothing that fits: nothing changes
    rest = nn.ModuleDict({"odd": nn.Linear(64, 40).to(torch.bfloat16), "fp32": nn.Linear(64, 32)})
    assert not use_cpu_gemm(rest)
    assert type(rest["odd"]) is nn.Linear and type(rest["fp32"]) is nn.Linear


def test_int8_and_int4_modules_agree_for_few_and_many_rows():
    torch.manual_seed(1)
    lin = nn.Linear(128, 80, bias=False).to(torch.bfloat16)
    q8, q4 = Int8Linear(lin), Int4Linear(lin)
    assert q8.use_kernel and q4.use_kernel
    # a layer keeps the layouts its plan reads: the int8 codes for dequantize, only where it is used
    assert "weight" in dict(q8.named_buffers())
    assert "weight" not in dict(Int8Linear(lin, RowPlan("lamina", "lamina", "lamina")).named_buffers())
    x = torch.randn(300, 128).to(torch.bfloat16)   # past both modules' dequantize thresholds
    for q, w in ((q8, q8.int8_weight().float() * q8.scale[:, None]), (q4, q4.dequantize(torch.float32))):
        ref = x.float() @ w.T
        tol = 0.02 * ref.abs().max().item()
        torch.testing.assert_close(q(x[:3]).float(), ref[:3], rtol=0, atol=tol)   # the packed kernel
        torch.testing.assert_close(q(x).float(), ref, rtol=0, atol=tol)           # dequantize + matmul


def test_use_cpu_gemm_with_a_tied_lm_head():
    """A tied lm_head gets its own packed copy; the embedding keeps its weight and still works."""
    torch.manual_seed(2)
    emb = nn.Embedding(64, 32).to(torch.bfloat16)
    model = nn.ModuleDict({"embed": emb, "proj": nn.Linear(32, 32).to(torch.bfloat16),
                           "head": nn.Linear(32, 64, bias=False).to(torch.bfloat16)})
    model["head"].weight = emb.weight
    weight = emb.weight

    def forward(ids):
        return model["head"](model["proj"](model["embed"](ids)))

    ids = torch.tensor([[3, 17, 63, 0, 41]])
    with torch.no_grad():
        before_emb, before = model["embed"](ids).clone(), forward(ids)
        assert use_cpu_gemm(model)
        assert isinstance(model["proj"], Bf16Linear) and isinstance(model["head"], Bf16Linear)
        assert model["embed"] is emb and emb.weight is weight
        torch.testing.assert_close(model["head"].packed, pack_bf16(weight), rtol=0, atol=0)
        torch.testing.assert_close(model["embed"](ids), before_emb, rtol=0, atol=0)
        after = forward(ids)
    # both run float32 sums rounded to bf16; they may differ by an ulp, through two layers
    torch.testing.assert_close(after.float(), before.float(), rtol=2 ** -6, atol=2 ** -7 * before.abs().max().item())


def test_switched_off_by_env(monkeypatch):
    monkeypatch.setenv("LAMINA_CPU_KERNELS", "0")
    assert not cpu_build.load()
    lin = nn.Linear(64, 16).to(torch.bfloat16)
    assert Bf16Linear.fits(lin)
    model = nn.Sequential(lin)
    assert not use_cpu_gemm(model) and model[0] is lin
    assert not Int8Linear(lin).use_kernel and not Int4Linear(nn.Linear(64, 16)).use_kernel


def test_bench_gemv_script_runs():
    """bench/gemv.py (lamina's GEMMs against torch's, per row count) on a tiny case."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, os.path.join(root, "bench", "gemv.py"), "--shape", "64x64",
                          "--rows", "1,3", "--layers", "2", "--rounds", "1"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit() and "->" not in line]
    assert [r[0] for r in rows] == ["1", "3"] and all(len(r) == 17 for r in rows), out
    assert "limits: bf16 GFLOP/s" in out and "read GB/s" in out and "of the read bandwidth" in out, out


def test_no_compiler_means_torch_ops_and_a_warning(monkeypatch, caplog):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with caplog.at_level("WARNING", logger="lamina.kernels"):
        assert not cpu_build.load(namespace="lamina_no_compiler")
    assert "unavailable, using torch's ops" in caplog.text
