"""What this process may run on this CPU, as the OS grants it rather than as cpuid reports it.

/proc/cpuinfo's flags are the kernel's view: it hides an extension whose register state the OS does
not save (AVX-512 without its XCR0 bits, say), and GCC's -march=native checks the same XCR0 bits.
AMX is different: on Linux a process must ask for its tile state (arch_prctl ARCH_REQ_XCOMP_PERM)
before its first AMX instruction, or that instruction faults (SIGILL), and a VM may show the AMX
flags yet refuse the request. `amx()` asks once per process and says what came of it; oneDNN (torch's
bf16 and int8 matmuls) uses AMX only once it is granted.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path

_SYS_ARCH_PRCTL = 158            # x86-64 syscall number
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18         # the AMX tile data state component


def cpu_id() -> str:
    """What a build or a measurement on this CPU depends on: its model name and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


@dataclass(frozen=True)
class AmxStatus:
    granted: bool
    reason: str          # why it is or is not usable, for `lamina env` and the start-up line


def _cpu_has_amx() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return False
    return "amx_tile" in flags


@functools.cache
def amx() -> AmxStatus:
    """Ask the kernel for AMX tile state for this process (once; the grant is per process)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return AmxStatus(False, f"x86-64 Linux only (this is {platform.system()} {platform.machine()})")
    if not _cpu_has_amx():
        return AmxStatus(False, "this CPU has no AMX")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0:
        return AmxStatus(True, "granted by the kernel (arch_prctl ARCH_REQ_XCOMP_PERM)")
    code = ctypes.get_errno()
    return AmxStatus(False, f"refused by the kernel: arch_prctl ARCH_REQ_XCOMP_PERM failed with "
                            f"{errno.errorcode.get(code, code)} ({os.strerror(code)})")
