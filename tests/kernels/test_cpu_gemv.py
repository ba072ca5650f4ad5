"""lamina's C++ CPU GEMVs (lamina/kernels/cpu_gemv.cpp) against plain torch on the same inputs.

The build on this machine takes the AVX-512 paths where the CPU has them; a second build for a
baseline x86-64 CPU covers the plain C++ paths that other machines run.
"""
import platform

import pytest
import torch
from torch import nn

from lamina.kernels import cpu
from lamina.models.quant import BF16_GEMV_MAX_ROWS, INT8_DEQUANT_MIN_ROWS, Bf16Linear, Int8Linear, use_cpu_gemv

pytestmark = pytest.mark.skipif(not cpu.load(), reason="no C++ compiler to build lamina's CPU kernels")

SHAPES = [(1, 576, 960), (3, 576, 64), (5, 1536, 576), (2, 96, 7), (16, 100, 9), (4, 64, 130)]


def _bf16_reference(x, w):
    return x.float() @ w.float().T


def _check_ops(ns: str):
    ops = getattr(torch.ops, ns)
    for m, k, n in SHAPES:
        torch.manual_seed(m * k + n)
        x = torch.randn(m, k)
        w = torch.randn(n, k).to(torch.bfloat16)
        for xin in (x.to(torch.bfloat16), x):
            got = ops.bf16_linear(xin, w)
            assert got.dtype == xin.dtype and got.shape == (m, n)
            # x goes in as bf16 (the AVX-512 path multiplies bf16 pairs), sums are float32, the
            # result is rounded to x's dtype
            ref = _bf16_reference(x.to(torch.bfloat16), w)
            tol = (2 ** -7 if xin.dtype == torch.bfloat16 else 1e-5) * ref.abs().max().item()
            torch.testing.assert_close(got.float(), ref, rtol=0, atol=tol)
        w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        scale = torch.rand(n) * 0.01 + 1e-3
        got = ops.int8_linear(x, w8, scale)
        ref = x @ (w8.float() * scale[:, None]).T
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5 * ref.abs().max().item())


def test_ops_match_torch_on_this_cpu():
    _check_ops("lamina")


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the baseline build targets x86-64")
def test_plain_paths_match_torch():
    """The same source built for an x86-64-v2 CPU (no AVX-512): what other machines run."""
    assert cpu.load(namespace="lamina_plain", march="x86-64-v2")
    _check_ops("lamina_plain")


def test_ops_reject_bad_shapes_with_a_clear_error():
    w = torch.zeros(8, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"x must be \[M, 64\]"):
        torch.ops.lamina.bf16_linear(torch.zeros(2, 32, dtype=torch.bfloat16), w)
    with pytest.raises(RuntimeError, match="int8 weight"):
        torch.ops.lamina.int8_linear(torch.zeros(2, 64), w, torch.ones(8))


def test_ops_compile_without_graph_breaks():
    """torch.compile traces the ops (their shapes are registered) into one graph."""
    w = torch.randn(48, 64).to(torch.bfloat16)
    w8, scale = torch.randint(-127, 128, (32, 48), dtype=torch.int8), torch.rand(32)

    def f(x):
        return torch.ops.lamina.int8_linear(torch.relu(torch.ops.lamina.bf16_linear(x, w)), w8, scale) * 2

    x = torch.randn(3, 64).to(torch.bfloat16)
    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(x), f(x))


def test_bf16_linear_module_agrees_for_few_and_many_rows():
    torch.manual_seed(0)
    lin = nn.Linear(128, 80, bias=True).to(torch.bfloat16)
    mod = Bf16Linear(lin)
    x = torch.randn(2, BF16_GEMV_MAX_ROWS + 8, 128).to(torch.bfloat16)  # the rows of both paths
    ref = nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float())
    few = mod(x[:, :1])                                    # the GEMV
    many = mod(x)                                          # torch's matmul
    tol = 2 ** -6 * ref.abs().max().item()
    torch.testing.assert_close(few.float(), ref[:, :1], rtol=0, atol=tol)
    torch.testing.assert_close(many.float(), ref, rtol=0, atol=tol)


def test_int8_linear_module_agrees_for_few_and_many_rows():
    torch.manual_seed(1)
    q = Int8Linear(nn.Linear(128, 72, bias=False).to(torch.bfloat16))
    x = torch.randn(INT8_DEQUANT_MIN_ROWS + 4, 128).to(torch.bfloat16)
    ref = x.float() @ (q.weight.float() * q.scale[:, None]).T
    tol = 0.02 * ref.abs().max().item()
    torch.testing.assert_close(q(x[:3]).float(), ref[:3], rtol=0, atol=tol)   # the GEMV
    torch.testing.assert_close(q(x).float(), ref, rtol=0, atol=tol)           # dequantize + matmul


def test_use_cpu_gemv_keeps_tied_weights_tied():
    emb = nn.Embedding(50, 64).to(torch.bfloat16)
    model = nn.ModuleDict({"embed": emb, "proj": nn.Linear(64, 64).to(torch.bfloat16),
                           "head": nn.Linear(64, 50, bias=False).to(torch.bfloat16),
                           "fp32": nn.Linear(64, 4)})
    model["head"].weight = emb.weight
    assert use_cpu_gemv(model)
    assert isinstance(model["proj"], Bf16Linear) and isinstance(model["head"], Bf16Linear)
    assert model["head"].weight is emb.weight
    assert type(model["fp32"]) is nn.Linear  # float32 layers keep torch's GEMV


def test_switched_off_by_env(monkeypatch):
    monkeypatch.setenv("LAMINA_CPU_KERNELS", "0")
    assert not cpu.load()
    lin = nn.Linear(64, 8).to(torch.bfloat16)
    assert not use_cpu_gemv(nn.Sequential(lin)) and not Int8Linear(lin).use_gemv


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
