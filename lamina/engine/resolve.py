"""EngineConfig's "auto" values made concrete, once, at engine start.

`resolve()` turns what the user asked for (EngineConfig, with its "auto"s and Nones) and the
machine into a frozen ResolvedConfig: device, dtypes, kernel backend, how steps run, KV budget. The
engine logs it once; nothing below it re-resolves a default or reads the environment. Each rule is
a small function here, so `lamina env` reports exactly what an engine would choose.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from lamina import envs
from lamina.config import EngineConfig, ModelConfig
from lamina.distributed.sharding import Shard
from lamina.engine.autotune import plan_for
from lamina.engine.speculative import SpeculativeConfig
from lamina.kernels import Backend, get_backend
from lamina.kernels.dispatch import KernelPlan
from lamina.models.loader import DTYPES, resolve_dtype

log = logging.getLogger("lamina.engine")

# 32 conversations of 2k tokens of SmolLM2-135M fit, even in float32
DEFAULT_CPU_KV_BYTES = 4 << 30
EAGER, COMPILED, CUDA_GRAPHS = "eager", "compiled", "cuda-graphs"


@dataclass(frozen=True)
class ResolvedConfig:
    """Every engine setting, concrete. Sizes that need the loaded model (the KV blocks, the context
    the cache can hold) are settled by the engine right after, with dataclasses.replace."""
    model: str                          # as the user named it
    model_dir: str
    device: torch.device
    dtype: torch.dtype
    kv_cache_dtype: torch.dtype
    backend: Backend
    kernel_plan: KernelPlan             # which implementation serves each op and shape (measured)
    batch_invariant: bool               # a row's bits never depend on the other rows of its steps
    execution: str                      # eager | compiled | cuda-graphs
    execution_reason: str
    quantization: str | None
    max_model_len: int
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    kv_cache_memory: int | None         # bytes; None on CUDA: what gpu_memory_utilization leaves
    num_kv_blocks: int | None           # a fixed number of KV blocks (overrides kv_cache_memory)
    gpu_memory_utilization: float
    enable_prefix_caching: bool
    num_threads: int | None
    tensor_parallel_size: int
    seed: int
    log_stats_interval: float
    profile_steps: bool
    trace_dir: str | None
    profile_torch_steps: int
    speculative: SpeculativeConfig | None

    def summary(self) -> str:
        return (f"device {self.device}, dtype {_name(self.dtype)}, KV cache {_name(self.kv_cache_dtype)}, "
                f"attention {self.backend.name}, steps {self.execution} ({self.execution_reason}), "
                f"kernels {self.kernel_plan.summary()}, "
                f"quantization {self.quantization or 'none'}, context {self.max_model_len}, "
                f"max {self.max_num_seqs} sequences / {self.max_num_batched_tokens} tokens a step, "
                f"prefix caching {'on' if self.enable_prefix_caching else 'off'}, "
                f"speculative decoding {self.speculative.describe() if self.speculative else 'off'}"
                + (f", tensor parallel over {self.tensor_parallel_size} ranks" if self.tensor_parallel_size > 1 else "")
                + (", batch-invariant" if self.batch_invariant else ""))


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_device(name: str | None) -> torch.device:
    return torch.device(name) if name else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_kv_cache_dtype(name: str, device: torch.device, backend: Backend, dtype: torch.dtype) -> torch.dtype:
    """'auto': the model's dtype, except float32 on CPU with the torch backend, whose attention runs
    several times faster on a float32 cache. The cpu backend's C++ attention reads bf16 directly
    (half the bytes), and K/V come out of bf16 projections, so nothing is lost."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" and backend.name == "torch" else dtype
    if name not in DTYPES:
        raise ValueError(f"unknown kv_cache_dtype {name!r}; choose auto, float32, bfloat16 or float16")
    return DTYPES[name]


def resolve_execution(enforce_eager: bool | None, device: torch.device, backend: Backend,
                      tensor_parallel_size: int = 1) -> tuple[str, str]:
    """How steps run, and why. On CPU, compiled steps (built in the background); on CUDA, CUDA
    graphs of decode steps, which remove the launch overhead that compiling cuts on CPU (so
    --compile is ignored there). --enforce-eager, or $LAMINA_ENFORCE_EAGER when neither flag is
    given, turns both off; a backend that cannot run under a strategy says so here. A batch-invariant
    backend runs one eager path for every batch (a compiled step, swapped in mid-run and fusing
    torch's own ops, would round differently from the eager steps before it)."""
    if backend.batch_invariant:
        if enforce_eager is False:
            raise ValueError("--compile cannot serve batch-invariant mode: its steps run eagerly, one kernel "
                             "per op for every batch; drop --compile or the mode")
        return EAGER, "batch-invariant mode: one eager path for every batch"
    if enforce_eager is None and envs.enforce_eager():
        return EAGER, "$LAMINA_ENFORCE_EAGER is set"
    if enforce_eager:
        return EAGER, "--enforce-eager"
    if device.type == "cuda":
        if tensor_parallel_size > 1:
            return EAGER, "decode graphs over NCCL collectives are untested, so tensor parallelism runs eagerly"
        if not backend.cuda_graphs:
            return EAGER, f"the {backend.name} backend cannot be captured in CUDA graphs"
        return CUDA_GRAPHS, "decode steps replay CUDA graphs"
    if not backend.compilable:
        return EAGER, f"torch.compile cannot trace the {backend.name} backend's kernels on {device.type}"
    return COMPILED, "torch.compile'd in the background, eager until ready"


def resolve_batch_invariant(asked: bool | None, device: torch.device, backend: Backend, dtype: torch.dtype,
                            kv_dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the engine runs batch-invariant (asked, else $LAMINA_BATCH_INVARIANT); a ValueError
    where it cannot: every op must have a kernel whose sums for a row ignore the other rows."""
    on = envs.batch_invariant() if asked is None else asked
    if not on:
        return False
    if backend.name == "torch":
        raise ValueError("the torch attention backend has no batch-invariant mode (torch's attention splits its "
                         "work by query length); use the cpu or triton backend")
    if device.type != "cpu":
        raise ValueError(f"batch-invariant mode runs on CPU only for now: on {device.type} the GEMMs are "
                         "torch's, which choose their kernel (and so their order of sums) by the number of rows")
    if dtype != torch.bfloat16 or kv_dtype != torch.bfloat16:
        raise ValueError("batch-invariant mode on CPU needs a bfloat16 model and KV cache (lamina's GEMMs and "
                         f"attention); got dtype {_name(dtype)}, KV cache {_name(kv_dtype)}")
    from lamina.kernels import cpu
    if backend.name == "cpu" and head_dim not in cpu.PREFILL_HEAD_DIMS:
        raise ValueError(f"batch-invariant mode's CPU attention takes head_dim {cpu.PREFILL_HEAD_DIMS}, "
                         f"not {head_dim}")
    return True


def resolve(config: EngineConfig, model_dir: str, model_config: ModelConfig) -> ResolvedConfig:
    if config.profile_torch_steps < 0:
        raise ValueError(f"profile_torch_steps must be >= 0, got {config.profile_torch_steps}")
    if config.profile_torch_steps and not config.trace_dir:
        raise ValueError("profile_torch_steps writes its trace into trace_dir: give both")
    Shard(0, config.tensor_parallel_size).check(model_config)
    device = resolve_device(config.device)
    backend = get_backend(config.attention_backend, device)
    num_threads = config.num_threads
    if num_threads is None and device.type == "cpu" and config.tensor_parallel_size > 1:
        # the ranks on this machine share its cores: torch's default (all of them) would oversubscribe it
        ranks_here = envs.local_world_size() if envs.launched_by_torchrun() else config.tensor_parallel_size
        num_threads = max(1, (os.cpu_count() or 1) // ranks_here)
    dtype = resolve_dtype(config.dtype, device, model_config)
    kv_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, device, backend, dtype)
    if device.type == "cpu" and num_threads:
        torch.set_num_threads(num_threads)   # before the kernels are timed: at the threads that serve
    batch_invariant = resolve_batch_invariant(config.batch_invariant, device, backend, dtype, kv_dtype,
                                              model_config.head_dim)
    plan = plan_for(model_config, dtype, kv_dtype, config.quantization, backend.name, device,
                    config.tensor_parallel_size, batch_invariant)
    backend = get_backend(backend.name, device, attention=plan.attention, batch_invariant=batch_invariant)
    execution, reason = resolve_execution(config.enforce_eager, device, backend, config.tensor_parallel_size)
    if device.type == "cuda" and config.enforce_eager is False:
        log.warning("--compile is ignored on CUDA: decode steps replay CUDA graphs instead")
    kv_memory = config.kv_cache_memory
    if kv_memory is None and device.type == "cpu":
        kv_memory = DEFAULT_CPU_KV_BYTES
    return ResolvedConfig(
        model=config.model, model_dir=model_dir, device=device, dtype=dtype,
        kv_cache_dtype=kv_dtype, backend=backend, kernel_plan=plan, batch_invariant=batch_invariant,
        execution=execution, execution_reason=reason, quantization=config.quantization,
        max_model_len=config.max_model_len or model_config.max_position_embeddings,
        block_size=config.block_size, max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens, kv_cache_memory=kv_memory,
        num_kv_blocks=config.num_kv_blocks, gpu_memory_utilization=config.gpu_memory_utilization,
        enable_prefix_caching=config.enable_prefix_caching, num_threads=num_threads,
        tensor_parallel_size=config.tensor_parallel_size, seed=config.seed,
        log_stats_interval=config.log_stats_interval, profile_steps=config.profile_steps,
        trace_dir=config.trace_dir, profile_torch_steps=config.profile_torch_steps,
        speculative=SpeculativeConfig.parse(config.speculative_config))
