"""`lamina env`: what to paste into a bug report (as `vllm collect-env`), and which fast paths load here.

    versions      lamina, torch, triton, Python, ninja
    system        OS, CPU model and the flags lamina's kernels use, C++ compiler, CUDA devices
    fast paths    each with yes/no and why: lamina's C++ kernels, the attention backend that would be
                  chosen, compiled steps (CPU) or CUDA graphs (CUDA)
    dispatch      which implementation serves each op and shape class, as measured on this machine
                  (kernels/dispatch.py), from the cache the engines here have filled
    environment   the variables that change what lamina does (secrets redacted)

`fast_paths(device)` and `one_line_summary(...)` are the same facts for code: the engine logs the
one line at start-up.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

from lamina import envs

# /proc/cpuinfo flag -> the name in Intel's and AMD's manuals; what lamina's C++ kernels look for
CPU_FLAGS = {"avx512f": "AVX-512F", "avx512_bf16": "AVX512-BF16", "avx512_vnni": "AVX512-VNNI",
             "amx_tile": "AMX-TILE", "amx_bf16": "AMX-BF16", "amx_int8": "AMX-INT8"}
# the same, short, for one line
_SHORT = {"avx512f": "avx512", "avx512_bf16": "bf16", "avx512_vnni": "vnni", "amx_tile": "amx"}
# variables that change what lamina, torch or the compiler do; values of names with these words are hidden
_ENV_PREFIXES = ("LAMINA_", "TORCHINDUCTOR_", "TORCH_", "TRITON_", "OMP_", "MKL_", "CUDA_VISIBLE_DEVICES", "CXX", "CC")
_SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def lamina_version() -> str:
    from lamina import __version__
    return __version__


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.split("\n\n")[0].splitlines():
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())
    return fields


def cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_flags() -> dict[str, bool]:
    """Each flag of CPU_FLAGS: whether this CPU has it."""
    have = set(_cpuinfo().get("flags", "").split())
    return {flag: flag in have for flag in CPU_FLAGS}


def compiler_version() -> str:
    """The C++ compiler lamina builds its kernels with ($CXX, else c++) and its --version line."""
    from lamina.kernels import cpu_build
    name = cpu_build.compiler()
    path = shutil.which(name)
    if path is None:
        return f"none ({name!r} not found on PATH)"
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
        first = out.splitlines()[0] if out else "(no --version output)"
    except (OSError, subprocess.SubprocessError) as e:
        first = f"(--version failed: {e})"
    return f"{name} ({path}): {first}"


def cuda_devices() -> list[str]:
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append(f"cuda:{i} {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB")
    return out


def fast_paths(device: torch.device | str = "cpu") -> list[tuple[str, bool, str]]:
    """(name, yes/no, why) for each of lamina's fast paths on `device`, by the rules an engine
    resolves its config with (engine/resolve.py). Loads (and if need be builds) the C++ kernels on CPU."""
    from lamina.engine.resolve import COMPILED, CUDA_GRAPHS, resolve_execution
    from lamina.kernels import cpu_build, get_backend
    device = torch.device(device)
    paths = []
    if device.type == "cpu":
        if cpu_build.load():
            paths.append(("C++ kernels", True, f"loaded from {cpu_build.library()}"))
        else:
            paths.append(("C++ kernels", False, cpu_build.load_error() or cpu_build.unsupported_reason() or "not loaded"))
    else:
        paths.append(("C++ kernels", False, f"for CPU only (device is {device.type})"))

    source = "set by $LAMINA_ATTENTION_BACKEND" if envs.attention_backend() else "the default here"
    try:
        backend = get_backend(None, device)
    except Exception as e:  # noqa: BLE001 - report it, whatever it is
        paths.append(("attention backend", False, f"{type(e).__name__}: {e} ({source})"))
        return paths
    fast = {"cpu": "cpu", "cuda": "triton"}.get(device.type)
    if backend.name == fast:
        why = {"cpu": "C++ paged attention reading the KV cache in place", "triton": "lamina's Triton kernels"}[fast]
        paths.append(("attention backend", True, f"{backend.name}: {why} ({source})"))
    elif backend.name == "torch" and device.type == "cpu" and not envs.attention_backend():
        paths.append(("attention backend", False, "torch: the plain-torch reference, as the C++ kernels did not load"))
    else:
        paths.append(("attention backend", False, f"{backend.name}: not this device's fast backend ({fast}); {source}"))

    execution, reason = resolve_execution(None, device, backend)
    if device.type == "cpu":
        paths.append(("compiled steps", execution == COMPILED, reason))
        paths.append(("CUDA graphs", False, "CUDA only"))
    else:
        paths.append(("compiled steps", False, "CPU only: CUDA decode steps replay CUDA graphs instead"))
        paths.append(("CUDA graphs", execution == CUDA_GRAPHS, reason))
    return paths


def one_line_summary(*, device: torch.device | str, attention_backend: str, execution: str,
                     cpu_kernels: bool | None = None) -> str:
    """One line of the facts that explain a speed, for the start-up log, e.g.
    `lamina 0.1.0, torch 2.14.1, Python 3.11.7, CPU AMD EPYC (2 threads; avx512 bf16 vnni),
    C++ kernels: yes, attention: cpu, steps: compiled`. The caller passes what it resolved
    (`execution`: e.g. "compiled", "eager", "CUDA graphs"); `cpu_kernels` None asks kernels.cpu (which
    builds them if no one has yet)."""
    from lamina.kernels import cpu_build
    device = torch.device(device)
    flags = " ".join(_SHORT[f] for f, have in cpu_flags().items() if have and f in _SHORT)
    from lamina.cpu_features import amx
    if amx().granted:
        flags += " amx(granted)"
    cpu_part = f"CPU {cpu_model()} ({torch.get_num_threads()} threads{'; ' + flags.strip() if flags.strip() else ''})"
    parts = [f"lamina {lamina_version()}", f"torch {torch.__version__}", f"Python {platform.python_version()}", cpu_part]
    if device.type == "cuda":
        parts.append(f"GPU {torch.cuda.get_device_name(device)}")
    if device.type == "cpu":
        loaded = cpu_build.load() if cpu_kernels is None else cpu_kernels
        parts.append(f"C++ kernels: {'yes' if loaded else 'no'}")
    parts += [f"attention: {attention_backend}", f"steps: {execution}"]
    return ", ".join(parts)


def dispatch_rows() -> list[tuple[str, str]]:
    """What the dispatch cache of this machine (CPU, threads, versions) holds: for each op and shape
    measured, the implementation chosen per class and the times that chose it."""
    from lamina.kernels import dispatch
    path = dispatch.cache_path()
    rows = [("cache", f"{path} ({'exists' if path.exists() else 'none yet: the first engine start measures'})")]
    if envs.dispatch():
        rows.append(("$LAMINA_DISPATCH", envs.dispatch()))
    if not envs.autotune():
        rows.append(("$LAMINA_AUTOTUNE", "0: nothing measured; lamina's kernels where they load"))
    for name, classes in sorted(dispatch.read_cache(path).items()):
        default = dispatch.default_plan(name.split()[0], tuple(next(iter(classes.values()))))
        cells = []
        for cls, times in classes.items():
            best = dispatch.choose(times, getattr(default, cls, "lamina"))
            cells.append(f"{cls} {best} ({', '.join(f'{i} {s * 1e6:.0f} us' for i, s in sorted(times.items()))})")
        rows.append((name, "; ".join(cells)))
    return rows


def _environment() -> list[tuple[str, str]]:
    rows = []
    for name in sorted(os.environ):
        if name.startswith(_ENV_PREFIXES):
            secret = any(word in name for word in _SECRET_WORDS)
            rows.append((name, "(set, hidden)" if secret else os.environ[name]))
    return rows


def report(device: torch.device | str | None = None) -> str:
    """The whole report, as `lamina env` prints it."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    from lamina.cpu_features import amx
    device = torch.device(device)
    torch_build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU only"
    sections: list[tuple[str, list[tuple[str, str]]]] = [
        ("versions", [("lamina", lamina_version()), ("torch", f"{torch.__version__} ({torch_build} build)"),
                      ("triton", _version("triton")), ("Python", f"{platform.python_version()} ({sys.executable})"),
                      ("ninja", _version("ninja"))]),
        ("system", [("OS", platform.platform()),
                    ("CPU", f"{cpu_model()}, {os.cpu_count()} logical CPUs, torch uses {torch.get_num_threads()} threads"),
                    ("CPU flags", ", ".join(f"{CPU_FLAGS[f]} {'yes' if have else 'no'}" for f, have in cpu_flags().items())),
                    ("AMX", f"{'yes' if amx().granted else 'no'}: {amx().reason}"),
                    ("C++ compiler", compiler_version()),
                    ("CUDA devices", "; ".join(cuda_devices()) or "none")]),
        (f"fast paths (device {device})",
         [(name, f"{'yes' if ok else 'no':<3}  {why}") for name, ok, why in fast_paths(device)]),
        ("dispatch (kernels/dispatch.py)", dispatch_rows() if device.type == "cpu" else [("(CPU only)", "")]),
        ("environment", _environment() or [("(none set)", "")]),
    ]
    width = max(len(k) for _, rows in sections for k, _ in rows) + 2
    lines = ["lamina env: paste this into bug reports"]
    for title, rows in sections:
        lines.append("")
        lines.append(title)
        for key, value in rows:
            # a compiler's error runs over many lines: indent them under their row
            value = value.replace("\n", "\n" + " " * (width + 2))
            lines.append(f"  {key:<{width}}{value}".rstrip())
    return "\n".join(lines)


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
