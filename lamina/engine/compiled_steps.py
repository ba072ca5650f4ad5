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

Serving calls those graphs directly, not through torch.compile's front end (Dynamo): each graph is
registered for the range of rows its warm-up stands for, and a step picks its graph by its row count.
On a small model Dynamo's work at every call (checking its guards, fetching the module's few hundred
weight and cache tensors, its wrappers) is a tenth of a compiled decode step, and the only guards
that tell these graphs apart are on row counts. LAMINA_CHECK_COMPILED_DISPATCH=1 runs every step
through Dynamo as well and fails if its guards pick another graph, or hand it other inputs, than
the engine did (the compiled-step tests run with it).

The warm-up runs that compile each graph read and write only the runner's scratch KV block, which
no sequence ever owns, so they cannot disturb the requests being served meanwhile.

With tensor parallelism the graphs are built before serving instead, on every rank at once: a
warm-up step's collectives must meet the other ranks' in the same order, never a served step's.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
import threading
import time
import types

import torch

from lamina import envs
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
            return self.decode(input_ids, positions, _at_least_two_columns(md))
        # logits are taken outside the graph, since how many rows want them varies from 0 up
        x, residual = self.prefill(input_ids, positions, _prefill_metadata(md))
        return self.model.compute_logits(x, residual, md)

    @property
    def status(self) -> str:
        if self.error is not None:
            return "failed"
        return "ready" if self.done.is_set() else "compiling"

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every graph is built (or failed); True if they all work."""
        return self.done.wait(timeout) and self.error is None

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
            decode = CompiledMethod(self.model, type(self.model).forward, _mark_decode_dynamic, cpp_wrapper=True)
            for batch in self.decode_warm_ups:
                ids, positions, md = self._warm_up_step(batch, 1)
                decode.warm_up(batch, ids, positions, md)
            self.decode = decode
            if self.compile_prefill:
                prefill = CompiledMethod(self.model, type(self.model).hidden_states, _mark_prefill_dynamic)
                for tokens in self.prefill_warm_ups:
                    # as many sequences as keep each within the context (the RoPE table's length)
                    seqs = -(-tokens // (self.max_model_len - 1))
                    ids, positions, md = self._warm_up_step(seqs, -(-tokens // seqs))
                    prefill.warm_up(tokens, ids, positions, _prefill_metadata(md))
                self.prefill = prefill
            log.info("compiled steps ready (%s) in %.1f s: serving at full speed", what, time.perf_counter() - start)
        except Exception as e:  # serving goes on eagerly; tests and `status` make the failure loud
            self.error = e
            log.error("compiling the %s failed; serving eagerly: %s", what, e, exc_info=True)
        finally:
            if background:
                sys.setswitchinterval(switch_interval)
            self.done.set()

    def _warm_up_step(self, batch: int, tokens_each: int):
        """The inputs of a step of `batch` sequences of `tokens_each` new tokens, all in the scratch
        block (a long sequence's every block is that one). They are normal tensors, as the runner's
        are: inference tensors would give the graph other guards."""
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
        return ids, positions, md


class CompiledMethod:
    """One of the model's methods, torch.compile'd, whose graphs serving calls directly.

    Each warm-up runs through Dynamo, which compiles a graph for it; that graph then serves every
    step from the warm-up's row count up to the next warm-up's (the first one's serves smaller steps
    too). A step's inputs are put together the way Dynamo's own code for the graph would: the
    module's tensors (weights, KV caches, the RoPE table) read once, the step's tensors and sizes
    read from its arguments at each call.

    The modules never change after loading, so Dynamo's guards on them (over a thousand) are dropped
    as well; that is only safe while one compiled graph never serves another model. Dynamo keeps its
    graphs per code object, hence the method's code is copied for each engine."""

    def __init__(self, model, method, mark_dynamic, cpp_wrapper: bool = False):
        # cpp_wrapper makes a graph call its kernels from C++ rather than Python: a decode step's
        # ops are short enough for that to show; most prefill steps' are not (only the smallest, such
        # as verifying drafts, gain a little), and it would lengthen the prefill graph's first
        # compile by much more than that buys. Inductor's size asserts (every input's sizes and
        # strides checked at each call, a few hundred checks) are left out: a step's inputs come
        # from prepare(), and the module's tensors keep their shapes from loading on.
        self.inductor_options = {"cpp_wrapper": cpp_wrapper, "size_asserts": False}
        self.model = model
        self.mark_dynamic = mark_dynamic
        self.check = envs.check_compiled_dispatch()
        self.ranges: list[tuple[int, _Graph]] = []     # (first row count it serves, graph)
        self.name = method.__name__
        self._ran: list[tuple[_Graph, tuple, list]] = []   # graphs Dynamo ran: inputs, outputs
        own = types.FunctionType(method.__code__.replace(), method.__globals__, method.__name__,
                                 method.__defaults__, method.__closure__)
        self.dynamo = torch.compile(types.MethodType(own, model), backend=self._compile,
                                    options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, md: AttentionMetadata):
        rows = input_ids.shape[0]
        graph = self.ranges[0][1]
        for first, candidate in self.ranges:
            if rows >= first:
                graph = candidate
        args = graph.inputs({"input_ids": input_ids, "positions": positions, "md": md})
        out = graph.call(args)
        if self.check:
            self._check(graph, args, input_ids, positions, md)
        return out

    def warm_up(self, first_rows: int, input_ids, positions, md) -> None:
        """Run one step through Dynamo; the graph it ran serves from first_rows rows on."""
        self._ran.clear()
        out = self._through_dynamo(input_ids, positions, md)
        if len(self._ran) != 1:
            raise RuntimeError(f"a {first_rows}-row warm-up of the compiled {self.name} ran "
                               f"{len(self._ran)} graphs; serving calls exactly one graph a step")
        graph, _, outputs = self._ran[0]
        graph.learn_outputs(outputs, out)
        if not self.ranges or self.ranges[-1][1] is not graph:
            self.ranges.append((first_rows, graph))

    def _through_dynamo(self, input_ids, positions, md):
        self.mark_dynamic(input_ids, positions, md)
        with torch.inference_mode():
            return self.dynamo(input_ids, positions, md)

    def _compile(self, gm: torch.fx.GraphModule, example_inputs):
        """Dynamo's backend: Inductor, keeping the graph for serving to call directly."""
        from torch._inductor.compile_fx import compile_fx
        compiled = compile_fx(gm, example_inputs, config_patches=self.inductor_options)
        graph = _Graph(gm, compiled, self.model)

        def run_by_dynamo(*args):
            outputs = compiled(*args)
            self._ran.append((graph, args, outputs))
            return outputs
        return run_by_dynamo

    def _check(self, graph: _Graph, args: list, input_ids, positions, md) -> None:
        self._ran.clear()
        self._through_dynamo(input_ids, positions, md)
        if [ran[0] for ran in self._ran] != [graph]:
            raise RuntimeError(f"Dynamo's guards ran {len(self._ran)} graph(s) for a {input_ids.shape[0]}-row "
                               f"step, not the one the engine picked")
        theirs = self._ran[0][1]
        same = len(theirs) == len(args) and all(
            a is b if isinstance(a, torch.Tensor) else a == b for a, b in zip(args, theirs))
        if not same:
            raise RuntimeError(f"the engine gave the compiled {self.name} graph other inputs than Dynamo")


class _Graph:
    """One compiled graph and how a step's inputs become its arguments."""

    def __init__(self, gm: torch.fx.GraphModule, compiled, model):
        self.compiled = compiled
        self.output_structure: str | None = None   # "tensor" or "tuple", once a call through Dynamo showed it
        # Dynamo names each input by the Python expression it read it from (as its guards do):
        # L['self']... is the module's, L['md'].seq_lens and the like the step's
        fixed, exprs = [], []
        for node in gm.graph.find_nodes(op="placeholder"):
            source = node.meta["grapharg"].source
            name = source.name() if callable(source.name) else source.name
            if name.startswith("L['self']"):
                exprs.append(f"F[{len(fixed)}]")
                fixed.append(eval(name, {}, {"L": {"self": model}}))
            elif name.startswith("L["):
                exprs.append(name)
            else:
                raise RuntimeError(f"a compiled graph reads {name}, neither the module nor the step's arguments")
        self.inputs = functools.partial(eval(f"lambda F, L: [{', '.join(exprs)}]", {}), fixed)

    def call(self, args: list):
        outputs = self.compiled(*args)
        return outputs[0] if self.output_structure == "tensor" else tuple(outputs)

    def learn_outputs(self, outputs, returned) -> None:
        """What the method returns, in terms of the graph's outputs: all of them as a tuple, or the
        only one. Anything else (a value Dynamo builds after the graph) cannot be called directly."""
        if isinstance(returned, torch.Tensor) and len(outputs) == 1 and returned is outputs[0]:
            structure = "tensor"
        elif isinstance(returned, tuple) and len(returned) == len(outputs) and all(
                a is b for a, b in zip(returned, outputs)):
            structure = "tuple"
        else:
            raise RuntimeError("a compiled step returns more than its graph's outputs; it cannot be called directly")
        if self.output_structure not in (None, structure):
            raise RuntimeError("one compiled graph returned its outputs in two shapes")
        self.output_structure = structure


def _mark_decode_dynamic(input_ids, positions, md: AttentionMetadata) -> None:
    # the block-table width varies from the start; batches of 2+ vary in every batch dimension
    torch._dynamo.mark_dynamic(md.block_tables, 1)
    if md.num_seqs > 1:
        for t in (input_ids, positions, md.seq_lens, md.slot_mapping, md.block_tables, md.logits_indices,
                  md.query_start_loc):
            torch._dynamo.mark_dynamic(t, 0)


def _mark_prefill_dynamic(input_ids, positions, md: AttentionMetadata) -> None:
    for t in (input_ids, positions, md.slot_mapping, md.seq_lens, md.query_start_loc):
        torch._dynamo.mark_dynamic(t, 0)
    torch._dynamo.mark_dynamic(md.block_tables, 0)
    torch._dynamo.mark_dynamic(md.block_tables, 1)


def _prefill_metadata(md: AttentionMetadata) -> AttentionMetadata:
    """What the prefill graph runs over: at least two sequences (a single prompt gets an empty one
    beside it) and two block-table columns, so that no size is ever 0 or 1."""
    return _at_least_two_columns(md if md.num_seqs > 1 else _with_empty_sequence(md))


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
