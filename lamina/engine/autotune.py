"""The kernel plan of one engine: kernels/dispatch.py's measurements, run on this model's shapes.

`plan_for` lists the model's projections the way the model will be built (layers.linear_choices on
a model on the meta device: no memory, no weights), then times each op's implementations on random
weights of each shape, once per machine (the cache in dispatch.py), and attention on the model's
heads. It runs at engine start, before the weights load; `lamina env` shows what it chose. In
batch-invariant mode it measures nothing: each op takes dispatch.BATCH_INVARIANT's implementation.
"""
from __future__ import annotations

import functools
import logging
import time

import torch

from lamina import envs
from lamina.config import ModelConfig
from lamina.cpu_features import OthersMeter
from lamina.distributed.sharding import Shard
from lamina.kernels import AttentionMetadata, dispatch
from lamina.kernels.dispatch import ATTENTION_CLASSES, ROW_CLASSES, TUNE_ROWS, AttentionPlan, KernelPlan, RowPlan

log = logging.getLogger("lamina.engine")

# attention timings: a decode batch of this many sequences, and a prefill of one, at this context
ATTENTION_BATCH, ATTENTION_CONTEXT, BLOCK_SIZE = 8, 512, 16


def plan_for(cfg: ModelConfig, dtype: torch.dtype, kv_dtype: torch.dtype, quantization: str | None,
             backend_name: str, device: torch.device, tensor_parallel_size: int = 1,
             batch_invariant: bool = False) -> KernelPlan:
    """The shapes timed are one rank's (every rank's are the same) with tensor parallelism."""
    shard = Shard(0, tensor_parallel_size)
    overrides = dispatch.parse_overrides(envs.dispatch())
    if device.type != "cpu":
        return KernelPlan(source=f"nothing to choose on {device.type}", overrides=overrides)
    choices = _choices(cfg, dtype, quantization, shard)
    if batch_invariant:
        linears = tuple((key, dispatch.batch_invariant_plan(key[0], impls, overrides, "%s %dx%d" % key))
                        for key, impls, _ in choices)
        attention = dispatch.batch_invariant_plan("attention", ("lamina",), overrides)
        return KernelPlan(linears, attention, "batch-invariant: one implementation per op, not measured",
                          overrides, batch_invariant=True)
    measure = envs.autotune()
    facts = dispatch.cache_facts()
    path = dispatch.cache_path(facts)
    entries = dispatch.read_cache(path) if measure else {}
    started, measured = time.monotonic(), 0
    linears = []
    meter = OthersMeter().__enter__()
    for key, impls, no_prefill in choices:
        op, n, k = key
        default = dispatch.default_plan(op, impls)
        if not measure or len(impls) == 1:
            plan = default
        else:
            name = f"{op} {n}x{k}"
            classes = ("decode", "batch") if no_prefill else ROW_CLASSES
            if not dispatch.complete(entries.get(name), classes, impls):
                if measured == 0:
                    log.info("measuring which kernels are fastest on this machine (once; cached in %s)", path)
                entries[name] = _time_linear(op, n, k, impls, no_prefill)
                measured += 1
            plan = RowPlan(*(dispatch.choose(entries[name][c], getattr(default, c))
                             for c in ("decode", "batch", "batch" if no_prefill else "prefill")))
        linears.append((key, dispatch.apply_overrides(op, plan, overrides)))
    attention = AttentionPlan()
    if backend_name == "cpu" and measure:
        heads, kv_heads = shard.q_heads(cfg)[1], shard.kv_heads(cfg)[1]
        name = (f"attention {heads}x{kv_heads}x{cfg.head_dim} "
                f"{str(dtype)[6:]} q, {str(kv_dtype)[6:]} KV")
        if not dispatch.complete(entries.get(name), ATTENTION_CLASSES, ("lamina", "torch")):
            entries[name] = _time_attention(heads, kv_heads, cfg.head_dim, dtype, kv_dtype)
            measured += 1
        attention = AttentionPlan(*(dispatch.choose(entries[name][c], "lamina") for c in ATTENTION_CLASSES))
    attention = dispatch.apply_overrides("attention", attention, overrides)
    meter.__exit__(None, None, None)
    if measured and (meter.fraction or 0) > dispatch.BUSY_FRACTION:
        # another process's load skews every timing (2 threads on 2 cores collapse): good enough
        # to start with, not to keep
        log.warning("other processes used %.0f%% of the CPUs while lamina measured its kernels: the choice "
                    "serves this run only, and the next start measures again", 100 * meter.fraction)
        source = f"measured in {time.monotonic() - started:.1f} s on a busy machine, not cached"
    elif measured:
        dispatch.write_cache(path, facts, entries)
        source = f"measured in {time.monotonic() - started:.1f} s"
    else:
        source = "cached" if measure else "defaults: $LAMINA_AUTOTUNE=0"
    if overrides:
        source += ", with $LAMINA_DISPATCH"
    return KernelPlan(tuple(linears), attention, source, overrides)


def _choices(cfg: ModelConfig, dtype: torch.dtype, quantization: str | None, shard: Shard = Shard()):
    """((op, N, K), implementations, whether it never sees prefill rows) for each distinct projection."""
    from lamina.kernels import reference
    from lamina.layers import linear_choices
    from lamina.models.llama import LlamaForCausalLM
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, reference, shard=shard).to(dtype)
    seen = {}
    for c in linear_choices(model, quantization, torch.device("cpu")):
        key = (c.op, c.out_features, c.in_features)
        # the lm_head sees one row per sequence (logits are computed for the last token only)
        no_prefill = c.name == "lm_head" and seen.get(key, (None, True))[1]
        seen[key] = (c.impls, no_prefill)
    return [(key, impls, no_prefill) for key, (impls, no_prefill) in seen.items()]


def _time_linear(op: str, n: int, k: int, impls: tuple[str, ...], no_prefill: bool) -> dict:
    """class -> implementation -> seconds per call, on random weights of this shape."""
    from torch import nn

    from lamina.layers import LAYERS
    layer_type = LAYERS[op]
    tuning = RowPlan(*(impls + impls[-1:] * 2)[:3])       # a plan that keeps every implementation's layout
    bytes_per_weight = {"int8_linear": 1, "int4_linear": 0.5}.get(op, 2)
    out: dict[str, dict[str, float]] = {}
    layers: list = []
    gen = torch.Generator().manual_seed(0)
    for cls in ROW_CLASSES:
        if no_prefill and cls == "prefill":
            continue
        rows = TUNE_ROWS[cls]
        copies = dispatch.copies_for(int(n * k * bytes_per_weight), rows)
        while len(layers) < copies:
            # built on the meta device, then given its weight: nn.Linear's own initialization of
            # an lm_head-sized matrix costs more than timing it
            linear = nn.Linear(k, n, bias=False, device="meta", dtype=torch.bfloat16)
            weight = torch.empty(n, k, dtype=torch.bfloat16).uniform_(-k ** -0.5, k ** -0.5, generator=gen)
            linear.weight = nn.Parameter(weight, requires_grad=False)
            layers.append(layer_type(linear, tuning))
        x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
        with torch.inference_mode():
            out[cls] = dispatch.time_impls({impl: [functools.partial(layer.run, impl, x) for layer in layers[:copies]]
                                            for impl in impls})
    return out


def _time_attention(hq: int, hkv: int, d: int, dtype: torch.dtype, kv_dtype: torch.dtype) -> dict:
    """decode | prefill -> lamina | torch -> seconds per call, on this model's (or rank's) heads."""
    from lamina.kernels import cpu, reference
    blocks_per_seq = ATTENTION_CONTEXT // BLOCK_SIZE
    gen = torch.Generator().manual_seed(0)
    k_cache = torch.randn(ATTENTION_BATCH * blocks_per_seq, BLOCK_SIZE, hkv, d, generator=gen).to(kv_dtype)
    v_cache = torch.randn(k_cache.shape, generator=gen).to(kv_dtype)
    tables = torch.arange(ATTENTION_BATCH * blocks_per_seq, dtype=torch.int32).view(ATTENTION_BATCH, -1)

    def metadata(num_seqs: int, query_len: int) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=torch.arange(num_seqs + 1, dtype=torch.int32) * query_len,
            seq_lens=torch.full((num_seqs,), ATTENTION_CONTEXT, dtype=torch.int32),
            block_tables=tables[:num_seqs], slot_mapping=torch.zeros(num_seqs * query_len, dtype=torch.int64),
            max_query_len=query_len, max_seq_len=ATTENTION_CONTEXT)

    out = {}
    for cls, (num_seqs, query_len) in {"decode": (ATTENTION_BATCH, 1), "prefill": (1, ATTENTION_CONTEXT)}.items():
        md = metadata(num_seqs, query_len)
        q = torch.randn(num_seqs * query_len, hq, d, generator=gen).to(dtype)
        with torch.inference_mode():
            out[cls] = dispatch.time_impls({
                "lamina": [functools.partial(cpu.paged_attention, q, k_cache, v_cache, md, d ** -0.5)],
                "torch": [functools.partial(reference.paged_attention, q, k_cache, v_cache, md, d ** -0.5)]})
    return out
