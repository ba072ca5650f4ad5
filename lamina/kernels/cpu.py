"""lamina's C++ CPU kernels (cpu_ops.cpp, cpu_quant.cpp), and the "cpu" attention backend that uses them.

They are built on first use with the system's C++ compiler (the one torch.compile uses on CPU),
for this machine's CPU (-march=native), and cached under $LAMINA_HOME/kernels/ keyed by the
source, the flags, torch's version and the CPU. `load()` returns False (and the callers use torch's
ops) where there is no compiler, the build fails, the tensors are not on the CPU, or
$LAMINA_CPU_KERNELS=0.

The ops, registered in torch.ops.lamina:
    int8_packed_linear(x, packed, scale, split_x=True)
                                            x [M, K] float32/bf16, packed uint8 [N/16, K/32, 512]
                                            (quant.pack_int8), scale [N] float32 -> x's dtype
    int4_packed_linear(x, packed, split_x=True)
                                            x [M, K] float32/bf16, packed uint8 [N/16, K/32, 320]
                                            (quant.pack_int4: Q4_1's grid) -> x's dtype
    bf16_packed_linear(x, packed)           x [M, K] bf16, packed [N/16, K/2, 16, 2] bf16 (quant.pack_bf16)
    bf16_packed_swiglu(x, packed)           x [M, K] bf16, an MLP's [gate; up] weight [2I, K] packed by
                                            quant.pack_bf16_swiglu -> silu(x @ gate^T) * (x @ up^T) [M, I]
    paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale)
                                            q [B, Hq, D] float32/bf16 -> float32, caches float32/bf16
    paged_prefill_attention(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale)
                                            q [T, Hq, D] bf16, caches bf16, D 64 or 128 (causal)
    silu_and_mul(x)                         x [T, 2I] bf16 -> silu(x[:, :I]) * x[:, I:]
    add_rms_norm(x, residual, weight, eps)  bf16 -> (RMSNorm(x + residual) * weight, x + residual)
As an attention backend (kernels/__init__.py), this module is `reference` with C++ where it applies:
paged decode attention and (bf16) prefill attention, which read the cache in place where the torch
path gathers a padded copy first, and SwiGLU and residual-add RMSNorm for eager bf16 steps.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from lamina.kernels import reference

log = logging.getLogger("lamina.kernels")

SOURCES = [Path(__file__).with_name(name) for name in ("cpu_ops.cpp", "cpu_quant.cpp")]  # one library
HEADERS = [Path(__file__).with_name("cpu_common.h")]
_lock = threading.Lock()
_loaded: dict[tuple[str, str], bool] = {}


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _compile_command(sources: list[Path], output: Path, namespace: str, march: str) -> list[str]:
    from torch.utils import cpp_extension
    compiler = os.environ.get("CXX", "g++")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [compiler, "-O3", f"-march={march}", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-w",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-DLAMINA_NAMESPACE={namespace}",
            *(f"-I{p}" for p in cpp_extension.include_paths()), *map(str, sources), "-o", str(output),
            *(f"-L{p}" for p in cpp_extension.library_paths()), "-lc10", "-ltorch_cpu"]


def build(namespace: str = "lamina", march: str = "native") -> Path:
    """The shared library for these settings, compiled now unless cached. Raises on failure."""
    from lamina.registry import lamina_home
    probe = _compile_command(SOURCES, Path("out.so"), namespace, march)
    texts = [f.read_text() for f in SOURCES + HEADERS]
    key = hashlib.sha256("\0".join([*texts, *probe, torch.__version__, _cpu_id()]).encode()).hexdigest()[:16]
    cache = Path(lamina_home()) / "kernels"
    target = cache / f"cpu_ops-{namespace}-{key}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    # compiled beside the target and renamed into place, so concurrent builds never see half a file
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        partial = Path(tmp) / target.name
        done = subprocess.run(_compile_command(SOURCES, partial, namespace, march), capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"building {', '.join(f.name for f in SOURCES)} failed:\n{done.stderr[-4000:]}")
        os.replace(partial, target)
    return target


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


def load(namespace: str = "lamina", march: str = "native") -> bool:
    """Build (or find) and load the kernels into torch.ops.<namespace>; False if that failed."""
    if namespace == "lamina" and os.environ.get("LAMINA_CPU_KERNELS", "") == "0":
        return False
    with _lock:
        if (namespace, march) not in _loaded:
            try:
                torch.ops.load_library(str(build(namespace, march)))
                _register_shapes(namespace)
                _loaded[namespace, march] = True
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                log.warning("lamina's CPU kernels are unavailable, using torch's ops instead: %s", e)
                _loaded[namespace, march] = False
        return _loaded[namespace, march]


def usable(weight: torch.Tensor) -> bool:
    """Whether a layer with this weight can call torch.ops.lamina."""
    return weight.device.type == "cpu" and load()


# -- the "cpu" attention backend ---------------------------------------------------------------------
from lamina.kernels.reference import rotary_embedding, store_kv_cache  # noqa: E402,F401


def _eager_bf16(x: torch.Tensor) -> bool:
    """The C++ elementwise ops serve eager steps; a compiled step fuses torch's own."""
    return x.dtype == torch.bfloat16 and x.dim() == 2 and not torch.compiler.is_compiling()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    if residual is not None and weight.dtype == torch.bfloat16 and _eager_bf16(x):
        return torch.ops.lamina.add_rms_norm(x, residual, weight, eps)
    return reference.rms_norm(x, weight, eps, residual)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if _eager_bf16(x):
        return torch.ops.lamina.silu_and_mul(x)
    return reference.silu_and_mul(x)


PREFILL_HEAD_DIMS = (64, 128)  # what paged_prefill_attention is built for


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, md, scale: float) -> torch.Tensor:
    """reference.paged_attention, in C++: decode batches, and prefill on a bf16 cache."""
    if not md.is_decode:
        if q.dtype == k_cache.dtype == torch.bfloat16 and q.shape[-1] in PREFILL_HEAD_DIMS:
            return torch.ops.lamina.paged_prefill_attention(q, k_cache, v_cache, md.block_tables,
                                                            md.query_start_loc, md.seq_lens, scale)
        return reference.paged_attention(q, k_cache, v_cache, md, scale)
    # float32 out; a bf16 q goes in as it is (on a bf16 cache the scores then come from bf16 pairs)
    out = torch.ops.lamina.paged_decode_attention(q if q.dtype == torch.bfloat16 else q.float(), k_cache, v_cache,
                                                  md.block_tables, md.seq_lens, scale)
    return out.to(q.dtype)
