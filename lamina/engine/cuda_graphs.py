"""CUDA graphs of the decode step, one per batch-size bucket.

An eager decode step of a small model is mostly kernel-launch overhead: SmolLM2-135M runs ~15
kernels in each of its 30 layers, each a few microseconds of GPU work behind tens of microseconds
of Python. A CUDA graph records the whole step once and replays it with one launch.

A graph replays fixed addresses and fixed shapes, so:
- its inputs live in persistent buffers, sized for the largest bucket; a step copies its batch in
  and pads it up to the bucket's size. A padding row has seq_len 0 and slot -1: attention skips
  it, its K/V is not stored, and its logits are dropped;
- attention is launched for the longest sequence the engine allows (max_seq_len), since the
  number of decode splits is fixed at capture; the kernels skip the splits past each sequence's
  end, and read only the block-table columns that its seq_len covers;
- query_start_loc and logits_indices of a decode batch are always 0..B, so they never change.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from lamina.kernels import AttentionMetadata

log = logging.getLogger("lamina.engine")

Step = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]


def graph_batch_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then multiples of 16 (padding wastes at most 15 rows of a large batch), up to
    the first that holds max_batch."""
    candidates = [1, 2, 4, 8, *range(16, max_batch + 16, 16)]
    largest = next(s for s in candidates if s >= max_batch)
    return [s for s in candidates if s <= largest]


class DecodeGraphs:
    """Runs pure-decode batches of up to `max_batch` sequences through captured graphs of `step`.

    With capture=False nothing is recorded and `run` calls `step` on the padded buffers instead:
    the same padding, testable without a GPU."""

    def __init__(self, step: Step, max_batch: int, max_seq_len: int, block_size: int,
                 device: torch.device, capture: bool = True):
        self.step = step
        self.sizes = graph_batch_sizes(max_batch)
        self.max_batch = self.sizes[-1]
        self.max_seq_len = max_seq_len
        self.max_blocks = -(-max_seq_len // block_size)
        self.capture = capture
        n = self.max_batch
        i32, i64 = dict(dtype=torch.int32, device=device), dict(dtype=torch.int64, device=device)
        self.input_ids = torch.zeros(n, **i64)
        self.positions = torch.zeros(n, **i64)
        self.slot_mapping = torch.full((n,), -1, **i64)
        self.seq_lens = torch.zeros(n, **i32)
        self.block_tables = torch.zeros(n, self.max_blocks, **i32)
        self.query_start_loc = torch.arange(n + 1, **i32)
        self.logits_indices = torch.arange(n, **i64)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def fits(self, md: AttentionMetadata) -> bool:
        return (md.is_decode and md.num_seqs <= self.max_batch and md.max_seq_len <= self.max_seq_len
                and md.block_tables.shape[1] <= self.max_blocks)

    def _metadata(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[:size + 1], seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size], slot_mapping=self.slot_mapping[:size],
            max_query_len=1, max_seq_len=self.max_seq_len, logits_indices=self.logits_indices[:size])

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Record every bucket, largest first, so the smaller graphs reuse its memory pool."""
        start = time.perf_counter()
        pool = None
        for size in reversed(self.sizes):
            args = (self.input_ids[:size], self.positions[:size], self._metadata(size))
            # warm up outside the capture: Triton compiles its kernels on first launch, and torch
            # may allocate workspaces, neither of which a capture allows
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.step(*args)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self.step(*args)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()
        log.info("captured CUDA graphs of the decode step for batches %s in %.1f s",
                 ",".join(map(str, self.sizes)), time.perf_counter() - start)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        """Logits [num_seqs, vocab] of one decode batch (`fits(md)` must hold). The tensor is the
        graph's own output: the next run overwrites it."""
        n = md.num_seqs
        size = next(s for s in self.sizes if s >= n)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(md.slot_mapping)
        self.seq_lens[:n].copy_(md.seq_lens)
        self.block_tables[:n, :md.block_tables.shape[1]].copy_(md.block_tables)
        if size > n:  # rows left from a larger batch must not write K/V nor attend
            self.slot_mapping[n:size].fill_(-1)
            self.seq_lens[n:size].zero_()
        if self.capture:
            self.graphs[size].replay()
            return self.outputs[size][:n]
        return self.step(self.input_ids[:size], self.positions[:size], self._metadata(size))[:n]
