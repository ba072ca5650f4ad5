"""Tensor parallelism on this CPU: decode tok/s at TP=2 against TP=1, and what the collectives of
one decode step cost over gloo.

    python bench/tensor_parallel.py                      # batches 1 and 8, 5 rounds
    python bench/tensor_parallel.py --rounds 3 --batch 1 --compile
    python bench/tensor_parallel.py --model DIR          # a model whose heads split two ways

The default model (SmolLM2-135M: 9 query heads) cannot be split two ways, so by default the script
writes random weights (speed does not depend on them) at Qwen2.5-0.5B's shape (14 query heads, 2 KV
heads, 24 layers of 896, MLP 4864), as a Llama with the default model's tokenizer and vocabulary.

decode: one LLM per setting, both loaded at once, one thread per rank (TP=2 is two processes of one
thread each; TP=1 one process of one thread); each round times the decode steps of B sequences
(after their prefill) at TP=1 and TP=2 alternately, starting with a different one each round.
collectives: two processes of one thread over gloo run what a decode step of the model runs
between ranks (two all-reduces of [B, hidden] per layer, one for the embedding, one all-gather of
the logits' columns), timed step by step. Medians with their ranges; CPU time other processes used
during the run is reported beside them.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lamina import LLM, SamplingParams  # noqa: E402
from lamina.config import DEFAULT_MODEL, ModelConfig  # noqa: E402
from lamina.cpu_features import OthersMeter  # noqa: E402

SHAPE = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
             num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=1000000.0,
             tie_word_embeddings=True)


def random_model(path: str) -> str:
    """A Llama at SHAPE with random bf16 weights and the default model's tokenizer, written once."""
    import json
    import shutil

    from safetensors.torch import save_file

    from lamina.registry import pull
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return path
    os.makedirs(path, exist_ok=True)
    source = pull(DEFAULT_MODEL, quiet=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(os.path.join(source, name), path)
    with open(os.path.join(source, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    cfg = dict(SHAPE, architectures=["LlamaForCausalLM"], vocab_size=vocab, head_dim=64, torch_dtype="bfloat16")
    h, i, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_key_value_heads"] * 64
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)  # noqa: E731
    tensors = {"model.embed_tokens.weight": rand(vocab, h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        tensors.update({p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
                        p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
                        p + "mlp.gate_proj.weight": rand(i, h), p + "mlp.up_proj.weight": rand(i, h),
                        p + "mlp.down_proj.weight": rand(h, i),
                        p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                        p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)})
    save_file(tensors, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    return path


def decode_tok_s(llm: LLM, batch: int, new_tokens: int) -> float:
    """Tokens per second of the decode steps of `batch` sequences, prefill excluded."""
    engine = llm.engine
    params = SamplingParams(max_tokens=new_tokens + 1, temperature=0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(None, list(range(100 + i, 116 + i)), params)
    engine.step()                        # the prefill (and first token) of every sequence
    start, produced = time.perf_counter(), 0
    while engine.has_unfinished_requests():
        produced += sum(len(o.outputs[0].delta_token_ids) for o in engine.step())
    return produced / (time.perf_counter() - start)


def collectives(rank: int, port: int, cfg: ModelConfig, batch: int, steps: int, queue) -> None:
    import torch.distributed as dist

    from lamina.distributed.group import ParallelContext
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ctx = ParallelContext(rank, 2, torch.device("cpu"), dist.group.WORLD)
    hidden = torch.randn(batch, cfg.hidden_size).to(torch.bfloat16)
    logits = torch.randn(batch, -(-cfg.vocab_size // 2)).to(torch.bfloat16)
    times = []
    for step in range(steps + 5):
        start = time.perf_counter()
        for _ in range(2 * cfg.num_hidden_layers + 1):
            ctx.all_reduce(hidden)
        ctx.all_gather_columns(logits)
        if step >= 5:                    # the first steps set up gloo's connections
            times.append(time.perf_counter() - start)
    if rank == 0:
        queue.put(times)
    dist.destroy_process_group()


def time_collectives(cfg: ModelConfig, batch: int, steps: int) -> list[float]:
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=collectives, args=(r, port, cfg, batch, steps, queue)) for r in range(2)]
    for p in procs:
        p.start()
    times = queue.get(timeout=600)
    for p in procs:
        p.join()
    return times


def fmt(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    v = [x * scale for x in values]
    return f"{statistics.median(v):.{digits}f} ({min(v):.{digits}f}–{max(v):.{digits}f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a model directory (default: random weights at Qwen2.5-0.5B's shape)")
    ap.add_argument("--batch", type=int, action="append", help="decode batch sizes (default 1 and 8)")
    ap.add_argument("--tokens", type=int, default=64, help="decode steps per round (default 64)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="compiled CPU steps (default: eager, both settings)")
    args = ap.parse_args()
    batches = args.batch or [1, 8]
    engine = dict(num_threads=1, kv_cache_memory=256 << 20, max_model_len=1024, enforce_eager=not args.compile)
    import tempfile
    model = args.model or random_model(os.path.join(tempfile.gettempdir(), "lamina-bench-tp-qwen2.5-0.5b-shape"))
    tp1 = LLM(model, **engine)
    tp2 = LLM(model, tensor_parallel_size=2, **engine)
    tp1.wait_until_compiled()
    cfg = tp1.engine.model_config
    results = {(tp, b): [] for tp in (1, 2) for b in batches}
    with OthersMeter(pids=[p.pid for p in tp2.engine.workers.processes]) as meter:
        for r in range(args.rounds):
            order = [(1, tp1), (2, tp2)] if r % 2 == 0 else [(2, tp2), (1, tp1)]
            for b in batches:
                for tp, llm in order:
                    results[tp, b].append(decode_tok_s(llm, b, args.tokens))
    tp2.shutdown()
    comm = {b: time_collectives(cfg, b, steps=50) for b in batches}
    print(f"model {args.model or 'Qwen2.5-0.5B shape, random weights'} ({tp1.engine.config.summary().split(', attention')[0]}), "
          f"{'compiled' if args.compile else 'eager'} steps, one thread per rank, {args.rounds} rounds of "
          f"{args.tokens} decode steps; other processes used {100 * (meter.fraction or 0):.0f}% of the CPUs")
    print(f"weights read per rank: TP=1 {tp1.engine.runner.model.bytes_read / 2**20:.0f} MiB, "
          f"TP=2 rank 0 {tp2.engine.runner.model.bytes_read / 2**20:.0f} MiB")
    print()
    print("| batch | TP=1 decode tok/s | TP=2 decode tok/s | TP=2 / TP=1 | collectives per step, ms (gloo) | per collective, µs |")
    print("|---|---|---|---|---|---|")
    for b in batches:
        ratios = [y / x for x, y in zip(results[1, b], results[2, b])]
        per_reduce = [t / (2 * cfg.num_hidden_layers + 2) for t in comm[b]]
        print(f"| {b} | {fmt(results[1, b])} | {fmt(results[2, b])} | {fmt(ratios, digits=2)} | "
              f"{fmt(comm[b], 1e3, 2)} | {fmt(per_reduce, 1e6, 0)} |")


if __name__ == "__main__":
    main()
