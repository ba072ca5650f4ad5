"""What this process may run on this CPU, as the OS grants it rather than as cpuid reports it.

/proc/cpuinfo's flags are the kernel's view: it hides an extension whose register state the OS does
not save (AVX-512 without its XCR0 bits, say), and GCC's -march=native checks the same XCR0 bits.
AMX is different: on Linux a process must ask for its tile state (arch_prctl ARCH_REQ_XCOMP_PERM)
before its first AMX instruction, or that instruction faults (SIGILL), and a VM may show the AMX
flags yet refuse the request. `amx()` asks once per process and says what came of it; oneDNN (torch's
bf16 and int8 matmuls) uses AMX only once it is granted.

`OthersMeter` says how much of the CPUs other processes used while something ran: a timing taken
meanwhile is not this machine's (the kernel dispatch does not cache one; the bench flags one).
Nothing here imports torch.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform
import resource
import time
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


class OthersMeter:
    """How much CPU other processes used while a measurement ran: the machine's busy time
    (/proc/stat) minus this process's, its waited-for children's and the given `pids`' CPU time (a
    server that runs through the measurement), as a fraction of all CPUs over the wall time.

        with OthersMeter(pids=[server.pid]) as m:
            subprocess.run(...)
        m.fraction  # 0.0 on a quiet machine
    """

    def __init__(self, pids: list[int] | None = None):
        self.pids = list(pids or [])

    def __enter__(self):
        self.fraction = None
        self._start = self._read()
        return self

    def _read(self):
        try:
            with open("/proc/stat") as f:
                vals = [int(x) for x in f.readline().split()[1:]]
        except OSError:
            return None
        tick = os.sysconf("SC_CLK_TCK")
        busy = sum(vals[:8]) - vals[3] - (vals[4] if len(vals) > 4 else 0)
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        ours = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
        for pid in self.pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                ours += sum(int(x) for x in fields[11:15]) / tick  # utime stime cutime cstime
            except (OSError, IndexError, ValueError):
                pass
        return busy / tick, ours, time.time()

    def __exit__(self, *exc):
        end = self._read()
        if self._start and end:
            wall = end[2] - self._start[2]
            others = (end[0] - self._start[0]) - (end[1] - self._start[1])
            if wall > 0:
                self.fraction = round(max(0.0, others / (wall * (os.cpu_count() or 1))), 3)
        return False
