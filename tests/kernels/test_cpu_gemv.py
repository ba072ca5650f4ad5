"""lamina's C++ CPU kernels (lamina/kernels/cpu_ops.cpp) against plain torch on the same inputs:
the bf16 GEMM on packed weights, the int8 GEMV, and the modules of lamina/models/quant.py that
call them.

The build on this machine takes the AVX-512 paths where the CPU has them; a second build for a
baseline x86-64 CPU covers the plain C++ paths that other machines run.
"""
import platform

import pytest
import torch
from torch import nn

from lamina.kernels import cpu
from lamina.models.quant import INT8_DEQUANT_MIN_ROWS, Bf16Linear, Int8Linear, pack_bf16, use_cpu_gemm

pytestmark = pytest.mark.skipif(not cpu.load(), reason="no C++ compiler to build lamina's CPU kernels")

# (M, K, N). bf16_packed_linear tiles 8 rows x 3 blocks of 16 columns, in chunks of 128 rows:
# M covers one row, the 1..7-row remainder tiles and a second (partial) chunk; N covers strips of
# 1, 2 and 3 blocks (16, 32, 80 = one strip of 3 and one of 2); K a small model's sizes and a
# tiny one.
BF16_SHAPES = [(1, 576, 960), (3, 576, 48), (8, 1536, 80), (13, 64, 32), (130, 576, 16), (5, 2, 64),
               (1, 1536, 16), (2, 64, 128)]
INT8_SHAPES = [(1, 576, 960), (3, 576, 64), (5, 1536, 576), (2, 96, 7), (16, 100, 9), (4, 64, 130)]


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

    for m, k, n in INT8_SHAPES:
        torch.manual_seed(m * k + n)
        x = torch.randn(m, k)
        w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        scale = torch.rand(n) * 0.01 + 1e-3
        got = ops.int8_linear(x, w8, scale)
        ref = x @ (w8.float() * scale[:, None]).T
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5 * ref.abs().max().item())
        got = ops.int8_linear(x.to(torch.bfloat16), w8, scale)
        assert got.dtype == torch.bfloat16
        ref = x.to(torch.bfloat16).float() @ (w8.float() * scale[:, None]).T
        torch.testing.assert_close(got.float(), ref, rtol=2 ** -8, atol=1e-5 * ref.abs().max().item())


def test_pack_bf16_layout():
    """packed[b, p, c, i] = w[16 b + c, 2 p + i]."""
    w = torch.arange(32 * 6, dtype=torch.float32).view(32, 6).to(torch.bfloat16)
    packed = pack_bf16(w)
    assert packed.shape == (2, 3, 16, 2) and packed.is_contiguous()
    for b, p, c, i in [(0, 0, 0, 0), (0, 0, 0, 1), (0, 2, 5, 1), (1, 1, 15, 0), (1, 2, 3, 1)]:
        assert packed[b, p, c, i] == w[16 * b + c, 2 * p + i]


def test_ops_match_torch_on_this_cpu():
    _check_ops("lamina")


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the baseline build targets x86-64")
def test_plain_paths_match_torch():
    """The same source built for an x86-64-v2 CPU (no AVX-512): what other machines run."""
    assert cpu.load(namespace="lamina_plain", march="x86-64-v2")
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
    with pytest.raises(RuntimeError, match="int8 weight"):
        torch.ops.lamina.int8_linear(torch.zeros(2, 64), w, torch.ones(32))


def test_ops_compile_without_graph_breaks():
    """torch.compile traces the ops (their shapes are registered) into one graph."""
    packed = pack_bf16(torch.randn(48, 64).to(torch.bfloat16))
    w8, scale = torch.randint(-127, 128, (32, 48), dtype=torch.int8), torch.rand(32)

    def f(x):
        y = torch.relu(torch.ops.lamina.bf16_packed_linear(x, packed))
        return torch.ops.lamina.int8_linear(y, w8, scale) * 2

    x = torch.randn(3, 64).to(torch.bfloat16)
    compiled = torch.compile(f, fullgraph=True)
    out = compiled(x)
    assert out.shape == (3, 32) and out.dtype == torch.bfloat16
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


def test_int8_linear_module_agrees_for_few_and_many_rows():
    torch.manual_seed(1)
    q = Int8Linear(nn.Linear(128, 72, bias=False).to(torch.bfloat16))
    x = torch.randn(INT8_DEQUANT_MIN_ROWS + 4, 128).to(torch.bfloat16)
    ref = x.float() @ (q.weight.float() * q.scale[:, None]).T
    tol = 0.02 * ref.abs().max().item()
    torch.testing.assert_close(q(x[:3]).float(), ref[:3], rtol=0, atol=tol)   # the GEMV
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
    assert not cpu.load()
    lin = nn.Linear(64, 16).to(torch.bfloat16)
    assert Bf16Linear.fits(lin)
    model = nn.Sequential(lin)
    assert not use_cpu_gemm(model) and model[0] is lin
    assert not Int8Linear(lin).use_gemv


def test_bench_gemv_script_runs():
    """bench/gemv.py (the sweep behind quant.py's row thresholds) on a tiny case."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, os.path.join(root, "bench", "gemv.py"), "--shape", "64x32",
                          "--rows", "1,3", "--layers", "2", "--rounds", "1"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit() and "->" not in line]
    assert [r[0] for r in rows] == ["1", "3"] and all(len(r) == 11 for r in rows), out


def test_no_compiler_means_torch_ops_and_a_warning(monkeypatch, caplog):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with caplog.at_level("WARNING", logger="lamina.kernels"):
        assert not cpu.load(namespace="lamina_no_compiler")
    assert "unavailable, using torch's ops" in caplog.text
