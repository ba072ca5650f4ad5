"""Owns the model and its KV cache; turns a scheduled batch into one forward pass."""
from __future__ import annotations

import logging

import numpy as np
import torch

from lamina.config import EngineConfig
from lamina.engine.scheduler import ScheduledBatch
from lamina.kernels import AttentionMetadata
from lamina.models.loader import load_model

log = logging.getLogger("lamina.engine")

DEFAULT_CPU_KV_BYTES = 4 << 30  # 32 conversations of 2k tokens of SmolLM2-135M fit even in float32


def pick_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class ModelRunner:
    def __init__(self, config: EngineConfig, model_dir: str, max_model_len: int):
        self.config = config
        self.device = pick_device(config.device)
        if self.device.type == "cpu" and config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.model = load_model(model_dir, config.dtype, self.device, config.attention_backend, max_model_len)
        if config.quantization:
            from lamina.models.quant import quantize_model
            quantize_model(self.model, config.quantization)
        self.dtype = self.model.dtype
        self.kv_dtype = self._kv_cache_dtype(config.kv_cache_dtype)
        self.block_size = config.block_size
        self.num_blocks = self._num_blocks()
        cfg = self.model.config
        shape = (self.num_blocks, self.block_size, cfg.num_key_value_heads, cfg.head_dim)
        # zeros, not empty: padded lanes of a gathered block may be read (then masked), and 0 * NaN
        # from never-written memory would poison the output
        self.k_caches = [torch.zeros(shape, dtype=self.kv_dtype, device=self.device) for _ in range(cfg.num_hidden_layers)]
        self.v_caches = [torch.zeros(shape, dtype=self.kv_dtype, device=self.device) for _ in range(cfg.num_hidden_layers)]
        self.model.bind_kv_caches(self.k_caches, self.v_caches)
        # Decode steps are many tiny kernels: compiling fuses them and removes per-op overhead.
        # Prefill stays eager (it is matmul-bound). Inductor caches its output on disk across runs.
        self.compiled_forward = None
        if not config.enforce_eager:
            self.compiled_forward = torch.compile(self.model.forward)

    def _kv_cache_dtype(self, name: str) -> torch.dtype:
        """'auto': float32 on CPU, where torch's attention kernels run several times faster in
        float32 than in bf16 and the cache is small next to RAM; the model's dtype on GPUs."""
        if name == "auto":
            return torch.float32 if self.device.type == "cpu" else self.dtype
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
        if self.device.type == "cuda":
            budget = self._cuda_kv_budget()
        else:
            budget = self.config.kv_cache_memory or DEFAULT_CPU_KV_BYTES
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
        with torch.inference_mode():
            self.model(torch.zeros(tokens, dtype=torch.long, device=self.device),
                       torch.arange(tokens, device=self.device), md)
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
        if self.compiled_forward is not None and md.is_decode:
            return self.compiled_forward(input_ids, positions, md)
        return self.model(input_ids, positions, md)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
