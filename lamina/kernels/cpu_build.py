"""Building and loading lamina's C++ CPU kernels (cpu_ops.cpp, cpu_quant.cpp) into torch.ops.lamina.

They are built on first use by torch.utils.cpp_extension (which knows the -std, ABI, include and
library paths that this torch's headers need) with the system's C++ compiler (the one
torch.compile uses on CPU), for this machine's CPU (-march=native), and cached under
$LAMINA_HOME/kernels/ keyed by the sources, the flags, torch's version and the CPU. `load()` returns
False (and the callers use torch's ops) where there is no compiler, the build fails, the cached
library is not safe to load (owned or writable by someone else), or $LAMINA_CPU_KERNELS=0;
`load_error()` then says why. `expected_to_build()` says where a build should work (x86-64 Linux
with a C++ compiler, not switched off): there a failed build is a bug, and the tests fail on it.

The ops, registered in torch.ops.lamina:
    int8_packed_linear(x, packed, scale, split_x=True)
                                            x [M, K] float32/bf16, packed uint8 [N/16, K/32, 512]
                                            (layers.quant.pack_int8), scale [N] float32 -> x's dtype
    int4_packed_linear(x, packed, split_x=True)
                                            x [M, K] float32/bf16, packed uint8 [N/16, K/32, 320]
                                            (layers.quant.pack_int4: Q4_1's grid) -> x's dtype
    bf16_packed_linear(x, packed)           x [M, K] bf16, packed [N/16, K/2, 16, 2] bf16 (layers.linear.pack_bf16)
    bf16_packed_swiglu(x, packed)           x [M, K] bf16, an MLP's [gate; up] weight [2I, K] packed by
                                            layers.linear.pack_bf16_swiglu -> silu(x @ gate^T) * (x @ up^T) [M, I]
    paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale)
                                            q [B, Hq, D] float32/bf16 -> float32, caches float32/bf16
    paged_prefill_attention(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale)
                                            q [T, Hq, D] bf16, caches bf16, D 64 or 128 (causal)
    silu_and_mul(x)                         x [T, 2I] bf16 -> silu(x[:, :I]) * x[:, I:]
    add_rms_norm(x, residual, weight, eps)  bf16 -> (RMSNorm(x + residual) * weight, x + residual)
    rms_norm(x, weight, eps)                bf16 -> RMSNorm(x) * weight
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import stat
import sys
import threading
import time
from pathlib import Path

import torch

from lamina import envs
from lamina.cpu_features import cpu_id

log = logging.getLogger("lamina.kernels")

SOURCES = [Path(__file__).with_name(name) for name in ("cpu_ops.cpp", "cpu_quant.cpp")]  # one library
HEADERS = [Path(__file__).with_name("cpu_common.h")]
_lock = threading.Lock()
_loaded: dict[tuple[str, str], bool] = {}
_errors: dict[tuple[str, str], str] = {}
_libraries: dict[tuple[str, str], Path] = {}
_DONE = "built.sha256"  # written into the build folder once the library is complete: its hash


def compiler() -> str:
    """The C++ compiler cpp_extension runs: $CXX, else c++."""
    return envs.cxx()


def unsupported_reason() -> str | None:
    """Why lamina's C++ kernels are not expected to build here, or None where they are."""
    if not envs.cpu_kernels_enabled():
        return "switched off by LAMINA_CPU_KERNELS=0"
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"written and tested for x86-64 Linux (this is {platform.system()} {platform.machine()})"
    if shutil.which(compiler()) is None:
        return f"no C++ compiler ({compiler()!r}, or $CXX) on PATH"
    return None


def expected_to_build() -> bool:
    """Whether a build should work here: x86-64 Linux, a C++ compiler, not switched off. Where it
    should, a failed build is a bug (the tests fail on it rather than skip)."""
    return unsupported_reason() is None


def library(namespace: str = "lamina", march: str = "native") -> Path | None:
    """The shared library load() loaded for these settings (None if it has not)."""
    return _libraries.get((namespace, march))


def load_error(namespace: str = "lamina", march: str = "native") -> str | None:
    """Why load() returned False for these settings (None if it has not failed)."""
    if namespace == "lamina" and not envs.cpu_kernels_enabled():
        return "switched off by LAMINA_CPU_KERNELS=0"
    return _errors.get((namespace, march))


def _flags(namespace: str, march: str) -> tuple[list[str], list[str]]:
    """Our compile and link flags; cpp_extension adds -std, -fPIC, the ABI define and the paths."""
    return (["-O3", f"-march={march}", "-fopenmp", "-w", f"-DLAMINA_NAMESPACE={namespace}"], ["-fopenmp"])


def _unsafe(path: Path) -> str | None:
    """Why loading code from `path` would let someone else choose what runs here (None if it would not):
    it is owned by another user, or writable by its group or by everyone."""
    st = os.stat(path)
    if st.st_uid != os.getuid():
        return f"{path} is owned by uid {st.st_uid}, not by this user (uid {os.getuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by its group or by everyone (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _private_dir(path: Path) -> None:
    """Create `path` (not writable by group or others whatever the umask), or check an existing one."""
    path.mkdir(mode=0o755, parents=True, exist_ok=True)
    reason = _unsafe(path)
    if reason:
        raise RuntimeError(f"refusing to build or load lamina's C++ kernels there: {reason}. "
                           f"Remove it (or `chmod go-w` it if it is yours), or point $LAMINA_HOME elsewhere")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _complete(library: Path, warn: bool = True) -> bool:
    """Whether `library` is a finished build (its hash recorded after the build) that is safe to load."""
    done = library.parent / _DONE
    try:
        if done.read_text().strip() != _sha256(library):
            return False
    except OSError:
        return False
    reason = _unsafe(library) or _unsafe(done)
    if reason and warn:
        log.warning("not loading the cached C++ kernels: %s; rebuilding them", reason)
    return not reason


def _say(message: str) -> None:
    """One-time work shows on the terminal: through logging where the application set it up, else stderr."""
    if log.hasHandlers():
        log.info(message)
    else:
        print(message, file=sys.stderr, flush=True)


def _cpp_extension():
    """torch.utils.cpp_extension, imported without its warning that a CPU-only machine has no CUDA."""
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        quiet.setLevel(level)
    return cpp_extension


def build(namespace: str = "lamina", march: str = "native") -> Path:
    """The shared library for these settings, built now unless cached. Raises on failure.

    torch.utils.cpp_extension builds it with ninja in a folder named by the key below, which a later
    build reuses (a killed build leaves no temporary folder, only that folder's objects). Only a
    library whose hash was recorded after a complete build, owned by this user and writable by no one
    else, is loaded as it is; anything else is rebuilt under a lock that dies with its process."""
    from lamina.registry import lamina_home
    cflags, ldflags = _flags(namespace, march)
    texts = [f.read_text() for f in SOURCES + HEADERS]
    facts = [*texts, *cflags, *ldflags, compiler(), torch.__version__, sys.version.split()[0], cpu_id()]
    key = hashlib.sha256("\0".join(facts).encode()).hexdigest()[:16]
    name = f"cpu_ops_{namespace}_{key}"
    cache = Path(lamina_home()) / "kernels"
    folder = cache / name
    library = folder / f"{name}.so"
    _private_dir(cache)
    if folder.exists():
        _private_dir(folder)
        if _complete(library):
            return library
    if shutil.which(compiler()) is None:
        raise RuntimeError(f"no C++ compiler to build them ({compiler()!r}; set $CXX to choose one)")
    _private_dir(folder)
    if shutil.which("ninja") is None:
        try:  # the ninja package's binary, where its scripts folder is not on PATH (a venv not activated)
            import ninja
            os.environ["PATH"] = os.pathsep.join([os.environ.get("PATH", ""), ninja.BIN_DIR])
        except ImportError:
            pass
    import fcntl  # POSIX; elsewhere load() reports the ImportError
    with open(cache / f"{name}.lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)       # released by the kernel if this process dies
        if _complete(library, warn=False):          # another process built it while we waited
            return library
        # Holding our lock, no one else is building here: a `lock` file left by cpp_extension's older
        # file baton (torch < 2.14) is stale, and would make the build wait for ever.
        (folder / "lock").unlink(missing_ok=True)
        for stale in (library, folder / _DONE):     # never trust half a link
            stale.unlink(missing_ok=True)
        cpp_extension = _cpp_extension()
        # cpp_extension skips a build it has already run in this process; ours was removed just above
        getattr(getattr(cpp_extension, "JIT_EXTENSION_VERSIONER", None), "entries", {}).pop(name, None)
        _say(f"building lamina's C++ kernels for this CPU (once, 20-40 s on 2 cores) into {folder} ...")
        started = time.monotonic()
        cpp_extension.load(name, [str(s) for s in SOURCES], extra_cflags=cflags, extra_ldflags=ldflags,
                           build_directory=str(folder), is_python_module=False, verbose=False)
        library.chmod(0o755)
        partial = folder / f"{_DONE}.partial"
        partial.write_text(_sha256(library))
        os.replace(partial, folder / _DONE)
        _say(f"built lamina's C++ kernels in {time.monotonic() - started:.0f} s")
    return library


def _register_shapes(namespace: str) -> None:
    """What torch.compile needs to trace the ops: the output's shape and dtype."""
    torch.library.register_fake(f"{namespace}::int4_packed_linear")(
        lambda x, packed, split_x=True: x.new_empty(x.shape[0], packed.shape[0] * 16))
    torch.library.register_fake(f"{namespace}::int8_packed_linear")(
        lambda x, packed, scale, split_x=True: x.new_empty(x.shape[0], packed.shape[0] * 16))
    torch.library.register_fake(f"{namespace}::bf16_packed_linear")(
        lambda x, packed: x.new_empty(x.shape[0], packed.shape[0] * 16))
    torch.library.register_fake(f"{namespace}::bf16_packed_swiglu")(
        lambda x, packed: x.new_empty(x.shape[0], packed.shape[0] * 8))
    torch.library.register_fake(f"{namespace}::paged_decode_attention")(
        lambda q, *rest: torch.empty_like(q, dtype=torch.float32))
    torch.library.register_fake(f"{namespace}::paged_prefill_attention")(lambda q, *rest: torch.empty_like(q))
    torch.library.register_fake(f"{namespace}::silu_and_mul")(lambda x: x.new_empty(x.shape[0], x.shape[1] // 2))
    torch.library.register_fake(f"{namespace}::add_rms_norm")(lambda x, *rest: (torch.empty_like(x), torch.empty_like(x)))
    torch.library.register_fake(f"{namespace}::rms_norm")(lambda x, *rest: torch.empty_like(x))


def load(namespace: str = "lamina", march: str = "native") -> bool:
    """Build (or find) and load the kernels into torch.ops.<namespace>; False if that failed (see
    load_error())."""
    if namespace == "lamina" and not envs.cpu_kernels_enabled():
        return False
    with _lock:
        if (namespace, march) not in _loaded:
            try:
                # after a build, cpp_extension has loaded it already (loading it again is a no-op)
                path = build(namespace, march)
                torch.ops.load_library(str(path))
                _libraries[namespace, march] = path
                _register_shapes(namespace)
                _loaded[namespace, march] = True
            except Exception as e:  # a failed build must never stop lamina: torch's ops serve instead
                _errors[namespace, march] = f"{type(e).__name__}: {str(e)[-4000:]}"  # a compiler's last words
                log.warning("lamina's CPU kernels are unavailable, using torch's ops instead: %s", e)
                _loaded[namespace, march] = False
        return _loaded[namespace, march]
