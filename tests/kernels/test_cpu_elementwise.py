"""The cpu backend's C++ elementwise ops (eager bf16 steps) against the torch reference. They round
where torch's bf16 ops round, so SwiGLU and the residual add match bit for bit; the norm's float32
sum of squares runs in another order, which can move the rounded norm by one bf16 step (and the
output, the norm times the weight, by up to two)."""
import platform

import pytest
import torch

from lamina.kernels import cpu, cpu_build, reference

pytestmark = pytest.mark.usefixtures("cpu_kernels")  # skips only where no build is expected (conftest.py)


def _check(ops):
    g = torch.Generator().manual_seed(0)
    for rows, width in ((1, 3072), (7, 40), (40, 3072), (3, 24)):   # widths off the 16-lane grid too
        x = (torch.randn(rows, width, generator=g) * 4).to(torch.bfloat16)
        assert torch.equal(ops.silu_and_mul(x), reference.silu_and_mul(x))
        h = width // 2
        xr, res = torch.randn(rows, h, generator=g).to(torch.bfloat16), torch.randn(rows, h, generator=g).to(torch.bfloat16)
        w = torch.rand(h, generator=g).to(torch.bfloat16)
        out, new_residual = ops.add_rms_norm(xr, res, w, 1e-5)
        ref_out, ref_residual = reference.rms_norm(xr, w, 1e-5, res)
        assert torch.equal(new_residual, ref_residual)
        torch.testing.assert_close(out, ref_out, rtol=2 ** -6, atol=0)  # a step of normed, times w
        # the norm without a residual is the same row loop
        assert torch.equal(ops.rms_norm(new_residual, w, 1e-5), out)
        # and each row's bits are its own, whatever rows share the call
        assert all(torch.equal(ops.rms_norm(new_residual[i:i + 1], w, 1e-5), out[i:i + 1]) for i in range(rows))


def test_ops_match_reference_bit_for_bit():
    _check(torch.ops.lamina)


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the baseline build targets x86-64")
def test_plain_paths_match_reference():
    assert cpu_build.load(namespace="lamina_plain", march="x86-64-v2")
    _check(torch.ops.lamina_plain)


def test_backend_uses_them_for_eager_bf16_only():
    x = torch.randn(4, 64).to(torch.bfloat16)
    w = torch.ones(32, dtype=torch.bfloat16)
    torch.testing.assert_close(cpu.silu_and_mul(x), reference.silu_and_mul(x), rtol=0, atol=0)
    # float32 rows and the first norm (no residual) take the reference
    xf = torch.randn(4, 32)
    torch.testing.assert_close(cpu.rms_norm(xf, w.float(), 1e-5, xf), reference.rms_norm(xf, w.float(), 1e-5, xf))
    torch.testing.assert_close(cpu.rms_norm(x[:, :32], w, 1e-5), reference.rms_norm(x[:, :32], w, 1e-5))
    compiled = torch.compile(lambda t: cpu.silu_and_mul(t) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(x), reference.silu_and_mul(x) * 2)


def test_bad_input_is_a_clear_error():
    with pytest.raises(RuntimeError, match=r"bfloat16 \[T, 2I\]"):
        torch.ops.lamina.silu_and_mul(torch.zeros(2, 3, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="residual must be bfloat16"):
        torch.ops.lamina.add_rms_norm(torch.zeros(2, 4, dtype=torch.bfloat16), torch.zeros(2, 4),
                                      torch.ones(4, dtype=torch.bfloat16), 1e-5)


def test_a_compile_on_another_thread_leaves_eager_steps_alone(monkeypatch):
    """Steps run eagerly while their graphs compile on a background thread. torch's is_compiling()
    is a process-wide flag, set for the whole trace: the backend's eager/compiled choice must not
    read it, or eager steps on the serving thread would leave the C++ ops for the reference's."""
    import torch.compiler
    g = torch.Generator().manual_seed(1)
    x, res = (torch.randn(5, 64, generator=g).to(torch.bfloat16) for _ in range(2))
    w = torch.rand(64, generator=g).to(torch.bfloat16)
    monkeypatch.setattr(torch.compiler, "_is_compiling_flag", True)   # another thread is tracing
    assert torch.compiler.is_compiling()
    for got, want in zip(cpu.rms_norm(x, w, 1e-5, res), torch.ops.lamina.add_rms_norm(x, res, w, 1e-5)):
        assert torch.equal(got, want)
    calls = []
    monkeypatch.setattr(reference, "silu_and_mul", lambda t: calls.append(t) or t)
    cpu.silu_and_mul(torch.cat([x, res], dim=1))
    assert not calls
