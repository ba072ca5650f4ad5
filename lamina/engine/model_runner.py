"""Owns the model and its KV cache; turns a scheduled batch into one forward pass."""
from __future__ import annotations

import logging
import math
import mmap
import os

import numpy as np
import torch

from lamina.config import EngineConfig
from lamina.engine.compiled_steps import CompiledSteps
from lamina.engine.cuda_graphs import DecodeGraphs
from lamina.engine.scheduler import ScheduledBatch
from lamina.kernels import AttentionMetadata
from lamina.kernels.reference import GROUP_BY_LENGTH_MIN_BATCH
from lamina.models.loader import load_model

log = logging.getLogger("lamina.engine")

DEFAULT_CPU_KV_BYTES = 4 << 30  # 32 conversations of 2k tokens of SmolLM2-135M fit even in float32
# With the torch backend, decode batches up to this size run the compiled step: larger ones go
# eager, where attention groups them by length (no padding to the longest), which a compiled graph
# cannot. The cpu backend's C++ attention never pads, so there every decode batch is compiled.
COMPILED_MAX_BATCH = GROUP_BY_LENGTH_MIN_BATCH - 1
# Decode batches up to this size replay CUDA graphs (one per bucket: 1, 2, 4, 8, 16, 32, ...);
# larger ones are already long enough for launch overhead not to matter, and run eager.
MAX_GRAPH_BATCH = 512


def _eager_by_env() -> bool:
    return os.environ.get("LAMINA_ENFORCE_EAGER", "") not in ("", "0")


def use_compile(config: EngineConfig, device: torch.device) -> bool:
    """On CPU: unless --enforce-eager or $LAMINA_ENFORCE_EAGER. On CUDA never: CUDA graphs remove
    the launch overhead that compiling cuts on CPU, and Inductor could not build lamina's Triton
    kernels inside a step, so --compile is ignored there."""
    if device.type == "cuda":
        if config.enforce_eager is False:
            log.warning("--compile is ignored on CUDA: decode steps replay CUDA graphs instead")
        return False
    if config.enforce_eager is not None:
        return not config.enforce_eager
    return not _eager_by_env()


def use_cuda_graphs(config: EngineConfig, device: torch.device, triton_backend: bool) -> bool:
    """On CUDA with lamina's Triton kernels (the torch reference syncs with the host, which a
    capture forbids), unless --enforce-eager or $LAMINA_ENFORCE_EAGER."""
    if device.type != "cuda" or not triton_backend or config.enforce_eager:
        return False
    return config.enforce_eager is False or not _eager_by_env()


def pick_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def zeroed_cache(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A KV-cache tensor of zeros, not empty: padded lanes of a gathered block may be read (then
    masked), and 0 * NaN from never-written memory would poison the output. On CPU it lives in an
    anonymous mapping, whose pages the OS zeroes on first touch: writing gigabytes of zeros up front
    would hold the first answer back by seconds."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(shape)


class ModelRunner:
    def __init__(self, config: EngineConfig, model_dir: str, max_model_len: int):
        self.config = config
        self.device = pick_device(config.device)
        if self.device.type == "cpu" and config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.model = load_model(model_dir, config.dtype, self.device, config.attention_backend, max_model_len)
        from lamina.models.quant import quantize_model, use_cpu_gemm
        if config.quantization:
            quantize_model(self.model, config.quantization)
        use_cpu_gemm(self.model)  # what is left in bf16 on CPU
        self.dtype = self.model.dtype
        from lamina.kernels import cpu as cpu_backend
        from lamina.kernels import triton_ops
        self.cpu_ops = self.model.layers[0].self_attn.ops is cpu_backend  # the C++ attention backend
        triton_backend = self.model.layers[0].self_attn.ops is triton_ops
        self.kv_dtype = self._kv_cache_dtype(config.kv_cache_dtype)
        self.block_size = config.block_size
        self.num_blocks = self._num_blocks()
        # One block more than the scheduler hands out: the scratch block, which no sequence owns.
        # Warm-up steps write there, and so does a padding token's slot -1 in a compiled step.
        self.scratch_block = self.num_blocks
        cfg = self.model.config
        shape = (self.num_blocks + 1, self.block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.k_caches = [zeroed_cache(shape, self.kv_dtype, self.device) for _ in range(cfg.num_hidden_layers)]
        self.v_caches = [zeroed_cache(shape, self.kv_dtype, self.device) for _ in range(cfg.num_hidden_layers)]
        self.model.bind_kv_caches(self.k_caches, self.v_caches)
        # execution strategies, fastest first; a batch none of them fits runs eagerly
        self.compiled: CompiledSteps | None = None
        self.decode_graphs: DecodeGraphs | None = None
        if use_compile(config, self.device):
            # prefill (and mixed) steps too, where their attention is one C++ op (bf16) rather
            # than the reference's loop over sequences
            prefill = (self.cpu_ops and self.dtype == self.kv_dtype == torch.bfloat16
                       and cfg.head_dim in cpu_backend.PREFILL_HEAD_DIMS)
            self.compiled = CompiledSteps(self.model, self.device, self.scratch_block, self.block_size,
                                          max_decode_batch=None if self.cpu_ops else COMPILED_MAX_BATCH,
                                          compile_prefill=prefill)
        if use_cuda_graphs(config, self.device, triton_backend):
            self.decode_graphs = DecodeGraphs(self.model, min(config.max_num_seqs, MAX_GRAPH_BATCH),
                                              max_model_len, self.block_size, self.device)
            self.decode_graphs.capture_all()
        self.strategies = [s for s in (self.decode_graphs, self.compiled) if s is not None]

    @property
    def attention_backend(self) -> str:
        """The backend's name as --attention-backend takes it."""
        module = self.model.layers[0].self_attn.ops.__name__.rsplit(".", 1)[-1]
        return {"reference": "torch", "triton_ops": "triton"}.get(module, module)

    @property
    def execution(self) -> str:
        """How steps run, for the start-up line and `lamina env`."""
        if self.decode_graphs is not None:
            return f"CUDA graphs (decode batches up to {self.decode_graphs.max_batch})"
        if self.compiled is not None:
            return f"compiled CPU steps ({self.compiled.status})"
        return "eager"

    def _kv_cache_dtype(self, name: str) -> torch.dtype:
        """'auto': the model's dtype, except float32 on CPU with the torch backend, whose decode
        attention runs several times faster on a float32 cache. The cpu backend's C++ decode reads
        bf16 directly (half the bytes), and K/V come out of bf16 projections, so nothing is lost."""
        if name == "auto":
            return torch.float32 if self.device.type == "cpu" and not self.cpu_ops else self.dtype
        from lamina.models.loader import DTYPES
        if name not in DTYPES:
            raise ValueError(f"unknown kv_cache_dtype {name!r}; choose auto, float32, bfloat16 or float16")
        return DTYPES[name]

    @property
    def bytes_per_block(self) -> int:
        cfg = self.model.config
        elem = torch.empty((), dtype=self.kv_dtype).element_size()
        return 2 * cfg.num_hidden_layers * self.block_size * cfg.num_key_value_heads * cfg.head_dim * elem

    def _num_blocks(self) -> int:
        if self.config.num_gpu_blocks_override:
            return self.config.num_gpu_blocks_override
        if self.config.kv_cache_memory:
            budget = self.config.kv_cache_memory
        elif self.device.type == "cuda":
            budget = self._cuda_kv_budget()
        else:
            budget = DEFAULT_CPU_KV_BYTES
        num_blocks = int(budget // self.bytes_per_block)
        if num_blocks < 1:
            raise ValueError(f"the KV-cache budget of {budget} bytes holds no block of {self.bytes_per_block} bytes")
        return num_blocks

    def _cuda_kv_budget(self) -> int:
        """What is left for the cache after the weights and a warm-up forward of the largest batch."""
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cfg = self.model.config
        tokens = self.config.max_num_batched_tokens
        blocks = (tokens + self.block_size - 1) // self.block_size
        shape = (blocks, self.block_size, cfg.num_key_value_heads, cfg.head_dim)
        tmp = [torch.zeros(shape, dtype=self.kv_dtype, device=self.device) for _ in range(2)]
        self.model.bind_kv_caches([tmp[0]] * cfg.num_hidden_layers, [tmp[1]] * cfg.num_hidden_layers)
        md = AttentionMetadata(
            query_start_loc=torch.tensor([0, tokens], dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor([tokens], dtype=torch.int32, device=self.device),
            block_tables=torch.arange(blocks, dtype=torch.int32, device=self.device)[None],
            slot_mapping=torch.arange(tokens, dtype=torch.int64, device=self.device),
            max_query_len=tokens, max_seq_len=tokens)
        # positions wrap at the RoPE table's length: a model may allow fewer tokens per sequence
        # than a step may batch
        positions = torch.arange(tokens, device=self.device) % self.model.cos_sin_cache.shape[0]
        with torch.inference_mode():
            self.model(torch.zeros(tokens, dtype=torch.long, device=self.device), positions, md)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del tmp
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        used_by_others = total - free - torch.cuda.memory_allocated()
        return int(total * self.config.gpu_memory_utilization - peak - max(used_by_others, 0))

    # -- one step ----------------------------------------------------------------------------------
    def prepare(self, batch: ScheduledBatch, logits_rows: list[np.ndarray]):
        """Flat input tensors and attention metadata for the batch. `logits_rows[i]` lists which of
        sequence i's new tokens need logits (positions relative to its chunk)."""
        bs = self.block_size
        ids, pos, slots, qsl, seq_lens, wanted = [], [], [], [0], [], []
        for seq, n, rows in zip(batch.seqs, batch.num_new_tokens, logits_rows):
            start = seq.num_computed_tokens
            positions = np.arange(start, start + n)
            table = np.asarray(seq.block_table, dtype=np.int64)
            ids.append(np.asarray(seq.token_ids[start:start + n], dtype=np.int64))
            pos.append(positions)
            slots.append(table[positions // bs] * bs + positions % bs)
            wanted.append(rows + qsl[-1])
            qsl.append(qsl[-1] + n)
            seq_lens.append(start + n)
        width = max(len(s.block_table) for s in batch.seqs)
        tables = np.zeros((len(batch.seqs), width), dtype=np.int32)
        for i, seq in enumerate(batch.seqs):
            tables[i, :len(seq.block_table)] = seq.block_table
        dev = self.device
        to = lambda a, dtype: torch.from_numpy(np.ascontiguousarray(a)).to(dev, dtype=dtype, non_blocking=True)
        md = AttentionMetadata(
            query_start_loc=to(np.asarray(qsl), torch.int32),
            seq_lens=to(np.asarray(seq_lens), torch.int32),
            block_tables=to(tables, torch.int32),
            slot_mapping=to(np.concatenate(slots), torch.int64),
            max_query_len=max(batch.num_new_tokens),
            max_seq_len=max(seq_lens),
            logits_indices=to(np.concatenate(wanted), torch.int64),
        )
        return to(np.concatenate(ids), torch.long), to(np.concatenate(pos), torch.long), md

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        """Logits [len(md.logits_indices), vocab] (float32). On CUDA a pure-decode batch replays a
        captured graph, whose output tensor the next step overwrites."""
        for strategy in self.strategies:
            if strategy.fits(md):
                return strategy.run(input_ids, positions, md)
        return self.model(input_ids, positions, md)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
