"""Whole-model decode speed: a Llama-shaped model with random weights, torch vs Triton backend.

Builds lamina's `LlamaForCausalLM` at the Llama-3.2-1B or Llama-3.1-8B shape in bfloat16 with
random weights (speed does not depend on the values), fills a paged KV cache with random K/V as
if each sequence had `ctx` tokens already, then times single decode steps (one new token per
sequence: embedding, every layer with the chosen backend's kernels, final norm and lm_head).
Eager PyTorch, no CUDA graphs: the numbers include the launch overhead of every op.

    python bench/decode_model.py                    # 1b and 8b, batches 1..64, ctx 512 and 4096
    python bench/decode_model.py --model 8b --batch 1 --batch 32 --ctx 2048

Without CUDA it prints a note and exits 0. `--smoke` runs a tiny model on the CPU under the
Triton interpreter, to check this script itself.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lamina.config import ModelConfig  # noqa: E402
from lamina.kernels import AttentionMetadata, get_backend  # noqa: E402
from lamina.models.llama import LlamaForCausalLM  # noqa: E402

SHAPES = {
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128),
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16),
}


def build_model(shape: dict, backend: str, dtype: torch.dtype, device: str, max_len: int) -> LlamaForCausalLM:
    """The model at its final dtype and device (as lamina's loader builds it), random weights."""
    cfg = ModelConfig(**shape, max_position_embeddings=max_len, rope_theta=500000.0, rms_norm_eps=1e-5)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg, get_backend(backend, device).ops, max_len=max_len)
    finally:
        torch.set_default_dtype(default)
    model.to_empty(device=device)
    model.tie_weights()
    model.cos_sin_cache = model.cos_sin_cache.to(device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0, 0.02)
    return model.eval()


def decode_step_inputs(batch: int, ctx: int, block_size: int, vocab_size: int, device: str):
    """One decode step for `batch` sequences that each hold `ctx` cached tokens."""
    blocks_per_seq = -(-(ctx + 1) // block_size)
    tables = torch.randperm(batch * blocks_per_seq, device=device).to(torch.int32).view(batch, -1)
    slots = tables[:, ctx // block_size].long() * block_size + ctx % block_size
    md = AttentionMetadata(
        query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device=device),
        seq_lens=torch.full((batch,), ctx + 1, dtype=torch.int32, device=device),
        block_tables=tables, slot_mapping=slots, max_query_len=1, max_seq_len=ctx + 1,
        logits_indices=None)
    input_ids = torch.randint(0, vocab_size, (batch,), device=device)
    positions = torch.full((batch,), ctx, dtype=torch.long, device=device)
    return input_ids, positions, md, batch * blocks_per_seq


def time_steps(fn, steps: int, device: str) -> float:
    """Seconds per call, after warm-up."""
    for _ in range(3):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["1b", "8b"], action="append")
    p.add_argument("--batch", type=int, action="append")
    p.add_argument("--ctx", type=int, action="append")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--backend", choices=["torch", "triton"], action="append")
    p.add_argument("--smoke", action="store_true", help="a tiny model on the CPU under the Triton interpreter")
    args = p.parse_args(argv)
    models = args.model or ["1b", "8b"]
    batches, contexts = args.batch or [1, 8, 32, 64], args.ctx or [512, 4096]
    backends = args.backend or ["torch", "triton"]
    dtype, device = torch.bfloat16, "cuda"
    if args.smoke:
        models, batches, contexts, args.steps, dtype, device = ["tiny"], [1, 3], [40], 1, torch.float32, "cpu"
    elif not torch.cuda.is_available():
        print("bench/decode_model.py: no CUDA GPU here; the decode benchmark needs one. Nothing to do.")
        return 0
    else:
        print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")

    header = ["model", "backend", "batch", "ctx", "ms/step", "tokens/s", "weights GB/s"]
    rows = []
    for name in models:
        shape = SHAPES[name]
        for backend in backends:
            model = build_model(shape, backend, dtype, device, max(contexts) + 16)
            weight_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
            cfg = model.config
            for ctx in contexts:
                for batch in batches:
                    input_ids, positions, md, num_blocks = decode_step_inputs(
                        batch, ctx, args.block_size, cfg.vocab_size, device)
                    shape_kv = (num_blocks, args.block_size, cfg.num_key_value_heads, cfg.head_dim)
                    kv = [torch.randn(shape_kv, dtype=dtype, device=device) for _ in range(2 * cfg.num_hidden_layers)]
                    model.bind_kv_caches(kv[0::2], kv[1::2])
                    with torch.inference_mode():
                        t = time_steps(lambda: model(input_ids, positions, md), args.steps, device)
                    rows.append([name, backend, batch, ctx, f"{t * 1e3:.2f}", f"{batch / t:.0f}",
                                 f"{weight_bytes / t / 1e9:.0f}"])
                    print("  ".join(str(c) for c in rows[-1]), flush=True)
                    del kv
                    model.bind_kv_caches([None] * cfg.num_hidden_layers, [None] * cfg.num_hidden_layers)
                    if device == "cuda":
                        torch.cuda.empty_cache()
            del model
            if device == "cuda":
                torch.cuda.empty_cache()

    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print()
    for r in [header, ["-" * w for w in widths]] + rows:
        print("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
