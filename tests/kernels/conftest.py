import pytest

from lamina.kernels import cpu


@pytest.fixture(scope="session")
def cpu_kernels():
    """lamina's C++ kernels, loaded. They are skipped only where they are not expected to build
    (cpu.expected_to_build: no compiler, not x86-64 Linux, LAMINA_CPU_KERNELS=0); where they are,
    a failed build fails the test that needs them, with the compiler's error."""
    if not cpu.expected_to_build():
        pytest.skip(f"lamina's C++ kernels are not built here: {cpu.unsupported_reason()}")
    assert cpu.load(), f"lamina's C++ kernels failed to build where they should: {cpu.load_error()}"
