"""Weight-only int8/int4 linears: what they compute equals a matmul with their dequantized weights."""
import pytest
import torch
from torch import nn

from lamina.kernels import cpu_build
from lamina.kernels.dispatch import KernelPlan
from lamina.layers import build_linears
from lamina.layers.quant import INT4_GROUP_SIZE, Int4Linear, Int8Linear, quantize_int4


def quantize_model(model: nn.Module, method: str) -> None:
    """`model`'s linear layers quantized as an engine builds them, with the default plan."""
    build_linears(model, method, KernelPlan(), torch.device("cpu"))


def _linear(n, k, dtype, bias=False, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    return lin.to(dtype)


def test_int4_codes_and_error_bound():
    torch.manual_seed(0)
    w = torch.randn(64, 4 * INT4_GROUP_SIZE)
    codes, scale, lo = quantize_int4(w, INT4_GROUP_SIZE)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    groups = codes.view(64, 4, INT4_GROUP_SIZE).float()
    deq = groups * scale[..., None] + lo[..., None]
    err = (deq - w.view(64, 4, INT4_GROUP_SIZE)).abs()
    assert bool((err <= scale[..., None] / 2 + 1e-6).all())
    # every group spans its whole grid: min -> 0, max -> 15
    assert bool((groups.amin(-1) == 0).all()) and bool((groups.amax(-1) == 15).all())


def test_int4_recovers_a_q4_1_grid_exactly():
    """Weights that already sit on a Q4_1 grid (codes * d + m, min and max code used, as llama.cpp
    quantizes) come back with the same codes: the default model loses nothing more."""
    torch.manual_seed(1)
    n, groups = 32, 6
    codes = torch.randint(0, 16, (n, groups, INT4_GROUP_SIZE))
    codes[..., 0], codes[..., 1] = 0, 15
    d = torch.rand(n, groups, 1) * 0.01 + 1e-3
    m = torch.randn(n, groups, 1) * 0.05
    w = (codes * d + m).view(n, -1)
    got, scale, lo = quantize_int4(w, INT4_GROUP_SIZE)
    assert torch.equal(got.view_as(codes), codes.to(torch.uint8))
    torch.testing.assert_close(scale, d[..., 0], rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 3, 40])
def test_int4_linear_equals_dequantized_matmul(dtype, m):
    lin = _linear(96, 3 * INT4_GROUP_SIZE, dtype, bias=True)
    q = Int4Linear(lin)
    assert q.use_kernel == cpu_build.load()
    codes, scale, lo = quantize_int4(lin.weight.detach(), INT4_GROUP_SIZE)
    deq = (codes.view(96, 3, -1).float() * scale[..., None] + lo[..., None]).view(96, -1)
    x = torch.randn(2, m, lin.in_features).to(dtype)
    ref = x.float() @ deq.T + lin.bias.float()
    got = q(x)
    assert got.shape == (2, m, 96) and got.dtype == dtype
    # the packed kernel keeps the scale and minimum in bf16 (2^-9 relative)
    tol = 0.03 * ref.abs().max().item() if dtype == torch.bfloat16 or q.use_kernel else 1e-4
    assert (got.float() - ref).abs().max().item() <= tol
    # and the quantized weights are close to the originals: about 1/30 of each group's range
    assert (deq - lin.weight.float()).abs().max().item() <= 0.6 * scale.max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_linear_equals_dequantized_matmul(dtype):
    lin = _linear(80, 48, dtype)
    q = Int8Linear(lin)
    deq = q.int8_weight().float() * q.scale.float()[:, None]
    x = torch.randn(5, 48).to(dtype)
    ref = x.float() @ deq.T
    # the kernel rounds x to two int8 parts per group of 32 (~16 bits)
    tol = 0.03 * ref.abs().max().item() if dtype == torch.bfloat16 else 1e-4 * ref.abs().max().item()
    assert (q(x).float() - ref).abs().max().item() <= tol
    # half a step, plus up to 127 times the rounding of a bf16 scale (2^-9 of it): under one step
    step = 0.51 if dtype == torch.float32 else 1.0
    assert (deq - lin.weight.float()).abs().max().item() <= step * q.scale.float().max().item()


def test_quantize_model_replaces_linears_and_skips_odd_widths():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8), nn.Linear(8, 4)).to(torch.bfloat16)
    quantize_model(model, "int4")
    assert isinstance(model[0], Int4Linear) and isinstance(model[2], Int4Linear)
    assert model[0].use_kernel == cpu_build.load() and not model[2].use_kernel  # 8 outputs: no block of 16
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert model(x).shape == (3, 4)
    assert isinstance(model[3], nn.Linear)  # 8 input features: no whole group of 32, kept as is
    quantize_model(model, "int8")  # what is left is quantized to int8
    assert isinstance(model[3], Int8Linear)
    with pytest.raises(ValueError, match="int4"):
        quantize_model(model, "fp4")


def _reference_int4(lin):
    codes, scale, lo = quantize_int4(lin.weight.detach(), INT4_GROUP_SIZE)
    n = lin.out_features
    return (codes.view(n, -1, INT4_GROUP_SIZE).float() * scale[..., None] + lo[..., None]).view(n, -1)


@pytest.mark.parametrize("rows", [8, 300])  # 300: prefill-sized, the default plan's dequantize + matmul
def test_int4_packed_layout_dequantizes_and_many_rows_match(rows):
    lin = _linear(192, 4 * INT4_GROUP_SIZE, torch.bfloat16, seed=3)
    q = Int4Linear(lin)
    assert q.use_kernel == cpu_build.load()
    ref_w = _reference_int4(lin)
    # reading the packed layout back gives the same weights (up to the bf16 scale and zero)
    assert (q.dequantize(torch.float32) - ref_w).abs().max().item() <= 0.02 * ref_w.abs().max().item()
    x = torch.randn(rows, lin.in_features).to(torch.bfloat16)
    ref = x.float() @ ref_w.T + lin.bias.float() if lin.bias is not None else x.float() @ ref_w.T
    assert (q(x).float() - ref).abs().max().item() <= 0.03 * ref.abs().max().item()


def test_int8_many_rows_take_the_dequantized_matmul_and_agree():
    lin = _linear(64, 96, torch.bfloat16, seed=4)
    q = Int8Linear(lin)
    x = torch.randn(200, 96).to(torch.bfloat16)
    few, many = q(x[:8]).float(), q(x).float()  # packed kernel vs dequantize + matmul
    ref = x.float() @ (q.int8_weight().float() * q.scale.float()[:, None]).T
    tol = 0.03 * ref.abs().max().item()
    assert (many - ref).abs().max().item() <= tol and (few - ref[:8]).abs().max().item() <= tol


@pytest.mark.parametrize("kernels", [False, True], ids=["torch-ops", "cpu-kernels"])
def test_compiled_int4_model_matches_eager(kernels, monkeypatch):
    """A decode step of a quantized model compiles (the engine torch.compiles it on CPU), with and
    without lamina's kernels: int4 layers, and an int8 lm_head that without the kernels runs torch's
    int8 GEMV, whose Inductor lowering failed on bf16 inputs in torch 2.14 (LoweringException)."""
    if kernels and not cpu_build.load():
        pytest.skip(f"lamina's C++ kernels are not loaded here: {cpu_build.load_error()}")
    if not kernels:
        monkeypatch.setenv("LAMINA_CPU_KERNELS", "0")

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(64, 64, bias=False)
            self.lm_head = nn.Linear(64, 48, bias=False)

        def forward(self, x):
            return self.lm_head(torch.relu(self.proj(x)))

    torch.manual_seed(5)
    model = Tiny().to(torch.bfloat16)
    quantize_model(model, "int4")
    assert isinstance(model.proj, Int4Linear) and isinstance(model.lm_head, Int8Linear)
    assert model.lm_head.use_kernel == kernels
    x = torch.randn(2, 64).to(torch.bfloat16)   # two decode rows
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(compiled.float(), eager.float(), rtol=2 ** -6, atol=2 ** -6 * eager.abs().max().item())
