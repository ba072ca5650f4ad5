import os

# Triton kernels run under the interpreter wherever there is no GPU. This must be set before
# triton is first imported, so it lives at the root of the test session.
try:
    import torch
    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Engines in tests run eager (compiling each tiny test model would cost minutes); the tests of the
# compiled step ask for it with enforce_eager=False, which overrides this.
os.environ.setdefault("LAMINA_ENFORCE_EAGER", "1")
# Compiled steps serve by calling their graphs directly; in tests each step also runs through
# torch.compile's guards, which must pick the same graph with the same inputs.
os.environ.setdefault("LAMINA_CHECK_COMPILED_DISPATCH", "1")


# --- the default model (lamina.registry) -------------------------------------------------------
import pytest  # noqa: E402

from lamina.config import DEFAULT_MODEL  # noqa: E402
from lamina.kernels import cpu_build  # noqa: E402


@pytest.fixture(autouse=True)
def failed_steps_are_loud(request, monkeypatch):
    """The engine runs a failed step's sequences again one at a time, so that one request's bad data
    fails that request alone. A fast path that broke every batch would then still pass a test, one
    sequence at a time: in tests a failed step fails the test, except in tests that break a step on
    purpose (@pytest.mark.breaks_steps). Engines in other processes keep the engine's own handling."""
    if request.node.get_closest_marker("breaks_steps"):
        return
    from lamina.engine.engine import LLMEngine

    def fail(self, batch, outputs):
        raise AssertionError(f"a step of {len(batch.seqs)} sequence(s) failed: the exception above")

    monkeypatch.setattr(LLMEngine, "_run_one_by_one", fail)


@pytest.fixture(scope="session")
def cpu_kernels():
    """lamina's C++ kernels, loaded. They are skipped only where they are not expected to build
    (cpu_build.expected_to_build: no compiler, not x86-64 Linux, LAMINA_CPU_KERNELS=0); where they are,
    a failed build fails the test that needs them, with the compiler's error."""
    if not cpu_build.expected_to_build():
        pytest.skip(f"lamina's C++ kernels are not built here: {cpu_build.unsupported_reason()}")
    assert cpu_build.load(), f"lamina's C++ kernels failed to build where they should: {cpu_build.load_error()}"


@pytest.fixture(scope="session")
def default_model_dir() -> str:
    """The default model's directory, pulled once into $LAMINA_HOME if set, else into the default
    cache (~/.cache/lamina), so repeated local runs reuse it."""
    from lamina.registry import pull

    return pull(DEFAULT_MODEL, quiet=True)


@pytest.fixture(scope="session")
def default_gguf_path(default_model_dir) -> str:
    """The verified GGUF the default model was converted from (kept as source.gguf)."""
    from lamina.registry import SOURCE_GGUF

    return os.path.join(default_model_dir, SOURCE_GGUF)
