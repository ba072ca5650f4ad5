"""Owns the model and its KV cache; turns a scheduled batch into one forward pass.

With tensor parallelism every rank has a ModelRunner over its shard of the model and of the KV
cache. Rank 0's runner broadcasts each step's inputs (`send_steps`) before its own forward; the other
ranks receive them and call forward() the same way (lamina/distributed/worker.py)."""
from __future__ import annotations

import logging
import math
import mmap

import numpy as np
import torch
import torch.distributed as dist

from lamina.distributed.group import ParallelContext
from lamina.distributed.sharding import Shard
from lamina.distributed.steps import StepChannel
from lamina.engine.compiled_steps import CompiledSteps
from lamina.engine.cuda_graphs import DecodeGraphs
from lamina.engine.errors import ParallelFailure
from lamina.engine.resolve import COMPILED, CUDA_GRAPHS, ResolvedConfig
from lamina.engine.scheduler import ScheduledBatch
from lamina.kernels import AttentionMetadata
from lamina.layers import build_linears
from lamina.models.loader import load_model

log = logging.getLogger("lamina.engine")

# Decode batches up to this size replay CUDA graphs (one per bucket: 1, 2, 4, 8, 16, 32, ...);
# larger ones are already long enough for launch overhead not to matter, and run eager.
MAX_GRAPH_BATCH = 512


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
    def __init__(self, config: ResolvedConfig, parallel: ParallelContext | None = None,
                 send_steps: StepChannel | None = None,
                 kv_caches: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None):
        self.config = config
        self.device = config.device
        self.parallel = parallel
        self.send_steps = send_steps
        if self.device.type == "cpu" and config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.model = load_model(config.model_dir, config.dtype, self.device, config.backend, config.max_model_len,
                                shard=parallel.shard if parallel is not None else Shard())
        build_linears(self.model, config.quantization, config.kernel_plan, self.device, parallel)
        self.dtype = config.dtype
        self.kv_dtype = config.kv_cache_dtype
        self.block_size = config.block_size
        self.num_blocks = self._num_blocks()
        # One block more than the scheduler hands out: the scratch block, which no sequence owns.
        # Warm-up steps write there, and so does a padding token's slot -1 in a compiled step.
        self.scratch_block = self.num_blocks
        cfg = self.model.config
        shape = (self.num_blocks + 1, self.block_size, self.model.num_kv_heads, cfg.head_dim)
        if kv_caches is None:
            self.k_caches = [zeroed_cache(shape, self.kv_dtype, self.device) for _ in range(cfg.num_hidden_layers)]
            self.v_caches = [zeroed_cache(shape, self.kv_dtype, self.device) for _ in range(cfg.num_hidden_layers)]
        else:
            # another runner's cache, which this model reads and writes in its place (a self-draft:
            # the same layers and heads over the same blocks)
            self.k_caches, self.v_caches = kv_caches
            layout = [(tuple(c.shape), c.dtype) for c in self.k_caches + self.v_caches]
            if layout != [(shape, self.kv_dtype)] * (2 * cfg.num_hidden_layers):
                raise ValueError(f"a shared KV cache must be {cfg.num_hidden_layers} layers of {shape} "
                                 f"{self.kv_dtype}; got {layout[:1]} x {len(layout) // 2}")
        self.model.bind_kv_caches(self.k_caches, self.v_caches)
        # execution strategies, fastest first; a batch none of them fits runs eagerly
        self.compiled: CompiledSteps | None = None
        self.decode_graphs: DecodeGraphs | None = None
        backend = config.backend
        if config.execution == COMPILED:
            # prefill (and mixed) steps too, where the backend's attention is one op for them
            prefill = self.dtype == self.kv_dtype == torch.bfloat16 and cfg.head_dim in backend.compiled_prefill_head_dims
            self.compiled = CompiledSteps(self.model, self.device, self.scratch_block, self.block_size,
                                          max_decode_batch=backend.compiled_decode_max_batch, compile_prefill=prefill,
                                          row_boundaries=config.kernel_plan.row_boundaries(),
                                          max_num_seqs=config.max_num_seqs,
                                          max_step_tokens=config.max_num_batched_tokens,
                                          max_model_len=config.max_model_len,
                                          # the ranks' warm-up steps run their collectives together
                                          background=parallel is None)
        elif config.execution == CUDA_GRAPHS:
            self.decode_graphs = DecodeGraphs(self.model, min(config.max_num_seqs, MAX_GRAPH_BATCH),
                                              config.max_model_len, self.block_size, self.device)
            self.decode_graphs.capture_all()
        self.strategies = [s for s in (self.decode_graphs, self.compiled) if s is not None]

    @property
    def execution(self) -> str:
        """How steps run now, for the start-up line."""
        if self.decode_graphs is not None:
            return f"CUDA graphs (decode batches up to {self.decode_graphs.max_batch})"
        if self.compiled is not None:
            return f"compiled CPU steps ({self.compiled.status})"
        return "eager"

    @property
    def bytes_per_block(self) -> int:
        cfg = self.model.config
        elem = torch.empty((), dtype=self.kv_dtype).element_size()
        return 2 * cfg.num_hidden_layers * self.block_size * self.model.num_kv_heads * cfg.head_dim * elem

    def _num_blocks(self) -> int:
        if self.config.num_kv_blocks:
            return self.config.num_kv_blocks
        budget = self.config.kv_cache_memory or self._cuda_kv_budget()
        num_blocks = int(budget // self.bytes_per_block)
        if self.parallel is not None:   # the scheduler's blocks must exist on every rank
            n = torch.tensor([num_blocks], dtype=torch.int64, device=self.device)
            dist.all_reduce(n, dist.ReduceOp.MIN, group=self.parallel.group)
            num_blocks = int(n.item())
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
        shape = (blocks, self.block_size, self.model.num_kv_heads, cfg.head_dim)
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
            ids.append(np.asarray(seq.step_token_ids(start, n), dtype=np.int64))
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

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        """Logits [len(md.logits_indices), vocab] (float32). On CUDA a pure-decode batch replays a
        captured graph, whose output tensor the next step overwrites. With tensor parallelism a
        failure is the group's (ParallelFailure): the ranks are no longer in step."""
        if self.parallel is None:
            return self._forward(input_ids, positions, md)
        try:
            if self.send_steps is not None:
                self.send_steps.send(input_ids, positions, md)
            return self._forward(input_ids, positions, md)
        except Exception as e:
            raise ParallelFailure(f"a tensor-parallel step failed on rank {self.parallel.rank}: {e}") from e

    @torch.inference_mode()
    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        for strategy in self.strategies:
            if strategy.fits(md):
                return strategy.run(input_ids, positions, md)
        return self.model(input_ids, positions, md)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
