"""Every environment variable lamina reads, read here and nowhere else.

Each is read when asked, not at import, so a test or a caller may set one before the engine starts.
`lamina env` lists those set.

    LAMINA_HOME               where models, converted GGUF files and built kernels live (~/.cache/lamina)
    LAMINA_ENFORCE_EAGER      1: no compiled steps on CPU, no CUDA graphs (as --enforce-eager)
    LAMINA_ATTENTION_BACKEND  torch | cpu | triton (as --attention-backend)
    LAMINA_CPU_KERNELS        0: never build or load lamina's C++ CPU kernels
    LAMINA_DISPATCH           which implementation serves an op: op=impl or op.class=impl, comma-separated
                              (kernels/dispatch.py; e.g. bf16_linear.prefill=torch,attention=lamina)
    LAMINA_AUTOTUNE           0: do not measure the kernels on first start; take lamina's where they load
    LAMINA_BATCH_INVARIANT    1: batch-invariant (deterministic) inference, as --batch-invariant
    LAMINA_CHECK_COMPILED_DISPATCH  1: run every compiled CPU step through torch.compile's guards too,
                              failing where they would pick another graph than the engine (tests)
    LAMINA_API_KEY            the server's API key when --api-key is not given
    LAMINA_TP_PARENT          set by lamina in the tensor-parallel workers it starts: the pid of rank 0
    RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT, TORCHELASTIC_RUN_ID
                              a tensor-parallel rank's place, as torchrun sets them (and lamina, for its workers)
    CXX                       the C++ compiler for the kernels (default c++)
    TRITON_INTERPRET          1: Triton kernels run in Triton's interpreter (tests without a GPU)
"""
from __future__ import annotations

import os

def lamina_home() -> str:
    home = os.environ.get("LAMINA_HOME")
    return os.path.abspath(os.path.expanduser(home or os.path.join("~", ".cache", "lamina")))


def enforce_eager() -> bool:
    return os.environ.get("LAMINA_ENFORCE_EAGER", "") not in ("", "0")


def attention_backend() -> str | None:
    return os.environ.get("LAMINA_ATTENTION_BACKEND") or None


def cpu_kernels_enabled() -> bool:
    return os.environ.get("LAMINA_CPU_KERNELS", "") != "0"


def dispatch() -> str | None:
    return os.environ.get("LAMINA_DISPATCH") or None


def autotune() -> bool:
    return os.environ.get("LAMINA_AUTOTUNE", "") != "0"


def batch_invariant() -> bool:
    return os.environ.get("LAMINA_BATCH_INVARIANT", "") not in ("", "0")


def check_compiled_dispatch() -> bool:
    return os.environ.get("LAMINA_CHECK_COMPILED_DISPATCH", "") not in ("", "0")


def api_key() -> str | None:
    return os.environ.get("LAMINA_API_KEY")


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def master() -> tuple[str, int]:
    return os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500"))


def tp_parent() -> int | None:
    parent = os.environ.get("LAMINA_TP_PARENT")
    return int(parent) if parent else None


def cxx() -> str:
    return os.environ.get("CXX", "c++")


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"
