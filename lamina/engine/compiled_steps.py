"""torch.compile'd CPU steps, built on a background thread while the engine serves eagerly.

Compiling SmolLM2's decode step takes minutes on a 2-core machine the first time (Inductor keeps
what it built on disk, so later starts take seconds to tens of seconds). Nobody should wait for
that before a first answer: the engine starts serving at once with eager steps, this object
compiles on a thread of its own, and each graph is swapped in as soon as it works.

Two graphs serve decode batches: batch 1, and every batch of 2+ (torch specializes sizes 0 and 1).
Where the backend compiles prefill too, one more graph serves every prefill and mixed step: a
single prompt is padded with an empty sequence, so no size is ever 0 or 1 there either. Where the
kernel plan switches a layer's implementation at some row count (`row_boundaries`), a graph holds one
side of it, so each range past a boundary gets a graph of its own, built here too: serving then
never compiles.

The warm-up runs that compile each graph read and write only the runner's scratch KV block, which
no sequence ever owns, so they cannot disturb the requests being served meanwhile.

With tensor parallelism the graphs are built before serving instead, on every rank at once: a
warm-up step's collectives must meet the other ranks' in the same order, never a served step's.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
import types

import torch

from lamina.kernels import AttentionMetadata

log = logging.getLogger("lamina.engine")

SERVING_SWITCH_INTERVAL = 0.00005  # seconds; CPython's default is 0.005


class CompiledSteps:
    """An execution strategy: `fits(md)` says whether a compiled graph serves this batch now,
    `run(...)` runs it. Until a graph is ready, nothing fits and the runner steps eagerly."""

    def __init__(self, model, device: torch.device, scratch_block: int, block_size: int,
                 max_decode_batch: int | None, compile_prefill: bool, background: bool = True,
                 row_boundaries: tuple[int, ...] = (), max_num_seqs: int = 256, max_step_tokens: int = 8192,
                 max_model_len: int = 8192):
        self.model = model
        self.max_model_len = max_model_len
        # one warm-up per range of rows the layers tell apart: decode batch sizes, and prefill tokens
        largest_decode = min(max_num_seqs, max_decode_batch or max_num_seqs)
        self.decode_warm_ups = [1, 2] + [b + 1 for b in row_boundaries if 2 < b + 1 <= largest_decode]
        self.prefill_warm_ups = [3] + [b + 1 for b in row_boundaries if 3 < b + 1 <= max_step_tokens]
        self.device = device
        self.scratch_block = scratch_block
        self.block_size = block_size
        self.max_decode_batch = max_decode_batch   # None: every decode batch
        self.compile_prefill = compile_prefill
        self.decode = None    # compiled forward, once it has run its warm-up
        self.prefill = None   # compiled hidden_states, likewise
        self.error: BaseException | None = None
        self.done = threading.Event()
        if background:
            self._thread = threading.Thread(target=self._build, name="lamina-compile", daemon=True)
            self._thread.start()
        else:
            self._build()

    # -- the strategy ------------------------------------------------------------------------------
    def fits(self, md: AttentionMetadata) -> bool:
        if md.is_decode:
            return self.decode is not None and (self.max_decode_batch is None or md.num_seqs <= self.max_decode_batch)
        return self.prefill is not None

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        if md.is_decode:
            return self._decode_step(self.decode, input_ids, positions, md)
        return self._prefill_step(self.prefill, input_ids, positions, md)

    @property
    def status(self) -> str:
        if self.error is not None:
            return "failed"
        return "ready" if self.done.is_set() else "compiling"

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every graph is built (or failed); True if they all work."""
        return self.done.wait(timeout) and self.error is None

    @staticmethod
    def _decode_step(graph, input_ids, positions, md):
        md = _at_least_two_columns(md)
        # the block-table width varies from the start; batches of 2+ vary in every batch dimension
        torch._dynamo.mark_dynamic(md.block_tables, 1)
        if md.num_seqs > 1:
            for t in (input_ids, positions, md.seq_lens, md.slot_mapping, md.block_tables, md.logits_indices,
                      md.query_start_loc):
                torch._dynamo.mark_dynamic(t, 0)
        return graph(input_ids, positions, md)

    def _prefill_step(self, graph, input_ids, positions, md):
        # logits are taken outside the graph, since how many rows want them varies from 0 up
        run = _at_least_two_columns(md if md.num_seqs > 1 else _with_empty_sequence(md))
        for t in (input_ids, positions, md.slot_mapping, run.seq_lens, run.query_start_loc):
            torch._dynamo.mark_dynamic(t, 0)
        torch._dynamo.mark_dynamic(run.block_tables, 0)
        torch._dynamo.mark_dynamic(run.block_tables, 1)
        x, residual = graph(input_ids, positions, run)
        return self.model.compute_logits(x, residual, md)

    # -- building ----------------------------------------------------------------------------------
    def _build(self) -> None:
        background = threading.current_thread() is not threading.main_thread()
        if background:
            _lower_thread_priority()
            # Tracing holds the GIL for long stretches, and a serving thread that gave it up inside
            # a torch op waits up to one switch interval to get it back: hundreds of ops a step
            # would each wait. A short interval while compiling keeps eager steps near full speed.
            switch_interval = sys.getswitchinterval()
            sys.setswitchinterval(min(switch_interval, SERVING_SWITCH_INTERVAL))
        start = time.perf_counter()
        what = "decode and prefill steps" if self.compile_prefill else "decode step"
        log.info("compiling the %s with torch.compile %s (minutes the first time, cached after; "
                 "--enforce-eager skips it)", what,
                 "in the background; serving eagerly meanwhile" if background else "before serving")
        try:
            decode = self._compile(type(self.model).forward, cpp_wrapper=True)
            for batch in self.decode_warm_ups:
                self._warm_up(self._decode_step, decode, batch, 1)
            self.decode = decode
            if self.compile_prefill:
                prefill = self._compile(type(self.model).hidden_states)
                for tokens in self.prefill_warm_ups:
                    # as many sequences as keep each within the context (the RoPE table's length)
                    seqs = -(-tokens // (self.max_model_len - 1))
                    self._warm_up(self._prefill_step, prefill, seqs, -(-tokens // seqs))
                self.prefill = prefill
            log.info("compiled steps ready (%s) in %.1f s: serving at full speed", what, time.perf_counter() - start)
        except Exception as e:  # serving goes on eagerly; tests and `status` make the failure loud
            self.error = e
            log.error("compiling the %s failed; serving eagerly: %s", what, e, exc_info=True)
        finally:
            if background:
                sys.setswitchinterval(switch_interval)
            self.done.set()

    def _compile(self, method, cpp_wrapper: bool = False):
        """torch.compile of this engine's own copy of one of the model's methods.

        The modules never change after loading, so their guards (over a thousand, a sizeable part of
        a decode step on a small model) are dropped; the guards on the step's inputs remain. That is
        only safe while one compiled graph never serves another model: Dynamo keeps its graphs per
        code object, hence the copy of the code. cpp_wrapper makes the decode graph call its kernels
        from C++ rather than Python (a decode step's ops are short enough for that to show; most prefill
        steps' are not, only the smallest, such as verifying drafts, gain a little, and it would
        lengthen the prefill graph's first compile by much more than that buys).

        Inductor's size asserts (every input's sizes and strides checked again at the graph's entry,
        a few hundred checks a call) are left out too: the guards check the step's inputs already,
        and the weights and KV caches, the other inputs, keep their shapes from loading on."""
        own = types.FunctionType(method.__code__.replace(), method.__globals__, method.__name__,
                                 method.__defaults__, method.__closure__)
        return torch.compile(types.MethodType(own, self.model),
                             options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
                                      "cpp_wrapper": cpp_wrapper, "size_asserts": False})

    def _warm_up(self, step, graph, batch: int, tokens_each: int) -> None:
        """One step through `graph` of `batch` sequences of `tokens_each` new tokens, all in the
        scratch block (a long sequence's every block is that one). The inputs are normal tensors, as
        the runner's are: inference tensors would give the graph other guards, and serving would
        compile again."""
        dev, n = self.device, batch * tokens_each
        i32 = dict(dtype=torch.int32, device=dev)
        width = max(2, -(-tokens_each // self.block_size))
        md = AttentionMetadata(
            query_start_loc=torch.arange(0, n + 1, tokens_each, **i32),
            seq_lens=torch.full((batch,), tokens_each, **i32),
            block_tables=torch.full((batch, width), self.scratch_block, **i32),
            slot_mapping=self.scratch_block * self.block_size + torch.arange(n, device=dev) % self.block_size,
            max_query_len=tokens_each, max_seq_len=tokens_each,
            logits_indices=torch.arange(tokens_each - 1, n, tokens_each, device=dev))
        ids = torch.zeros(n, dtype=torch.long, device=dev)
        positions = torch.arange(tokens_each, device=dev).repeat(batch)
        with torch.inference_mode():
            step(graph, ids, positions, md)


def _lower_thread_priority() -> None:
    """Compiling must not starve the threads that serve: lower this thread's CPU priority (and so
    that of the compile workers it starts). Linux sets niceness per thread."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass


def _at_least_two_columns(md: AttentionMetadata) -> AttentionMetadata:
    """A block table of width 1 would specialize the graph on that width; a zero column is never read."""
    if md.block_tables.shape[1] >= 2:
        return md
    with torch.inference_mode(False):
        tables = torch.cat([md.block_tables, torch.zeros_like(md.block_tables)], dim=1)
    return _replace(md, block_tables=tables)


def _with_empty_sequence(md: AttentionMetadata) -> AttentionMetadata:
    """md plus a sequence with no tokens: attention skips it; the batch then has 2 sequences.
    Built as normal tensors, like prepare()'s (inference tensors would fail the graph's guards)."""
    with torch.inference_mode(False):
        return _replace(md, query_start_loc=torch.cat([md.query_start_loc, md.query_start_loc[-1:]]),
                        seq_lens=torch.cat([md.seq_lens, md.seq_lens.new_zeros(1)]),
                        block_tables=torch.cat([md.block_tables, md.block_tables.new_zeros(1, md.block_tables.shape[1])]))


def _replace(md: AttentionMetadata, **changes) -> AttentionMetadata:
    fields = dict(query_start_loc=md.query_start_loc, seq_lens=md.seq_lens, block_tables=md.block_tables,
                  slot_mapping=md.slot_mapping, max_query_len=md.max_query_len, max_seq_len=md.max_seq_len,
                  logits_indices=md.logits_indices)
    return AttentionMetadata(**{**fields, **changes})
