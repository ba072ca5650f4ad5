"""lamina's engine on a CUDA GPU against transformers, in one process on the same weights.

    python bench/gpu.py --model-dir DIR                   # a Hugging Face checkpoint directory
    python bench/gpu.py --model-dir DIR --random-weights  # DIR holds config.json + tokenizer only:
                                                          # random bf16 weights are written there

Workloads (greedy, EOS ignored, bf16):
  single   one 48-token prompt, 256 new tokens: TTFT and decode tok/s; lamina with CUDA graphs
           (the default), lamina eager (--enforce-eager), transformers `generate`
  prefill  one 512-token prompt: tokens/s of the prefill step (lamina) / forward (transformers)
  batch    decode tok/s of B sequences at once (lamina, graphs vs eager): where graphs stop mattering
  offline  256 prompts of 16-512 tokens, 64 new tokens each (bench/offline.py's first set):
           lamina's engine against transformers' batched `generate` (batches of 32, left-padded,
           the prompts sorted by length first, as bench/offline.py does)
Speed does not depend on the weights' values, so a random checkpoint at a model's shape (config.json
copied from the real one) measures the same thing where the real weights cannot be fetched.
Without CUDA it prints a note and exits 0 (`--device cpu --quick` checks the script itself).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import batches_by_length, mixed_prompts, padded_tokens  # noqa: E402  (puts the repository on sys.path)
from lamina.config import EngineConfig  # noqa: E402
from lamina.engine.engine import LLMEngine  # noqa: E402
from lamina.sampling_params import SamplingParams  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def write_random_weights(model_dir: str) -> None:
    import transformers
    cfg = transformers.AutoConfig.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(model_dir)


def prompts_of(vocab: int, lengths: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    low = min(1000, vocab // 4)  # past the special tokens
    return [[rng.randrange(low, vocab) for _ in range(n)] for n in lengths]


def lamina_engine(args, eager: bool, **kw) -> LLMEngine:
    """eager=False is the default configuration (CUDA graphs on a GPU). Prefix caching is off: the
    workloads repeat prompts, and transformers has no such cache."""
    return LLMEngine(EngineConfig(model=args.model_dir, dtype="bfloat16", device=args.device,
                                  enforce_eager=True if eager else None, enable_prefix_caching=False,
                                  num_kv_blocks=args.kv_blocks, **kw))


def lamina_single(engine: LLMEngine, prompt: list[int], max_tokens: int, device) -> tuple[float, float]:
    """(TTFT s, decode tok/s after the first token) of one request alone."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    engine.add_request(f"s{time.monotonic_ns()}", {"prompt_token_ids": prompt}, params)
    start = time.perf_counter()
    engine.step()
    sync(device)
    first = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    sync(device)
    end = time.perf_counter()
    return first - start, (max_tokens - 1) / (end - first)


def lamina_batch_decode(engine: LLMEngine, batch: int, ctx: int, steps: int, vocab: int, device) -> float:
    """Decode tok/s of `batch` sequences of ~ctx tokens, timed over `steps` pure-decode steps."""
    params = SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts_of(vocab, [ctx] * batch, seed=batch)):
        engine.add_request(f"b{batch}-{i}", {"prompt_token_ids": p}, params)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    for _ in range(3):
        engine.step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync(device)
    rate = batch * steps / (time.perf_counter() - start)
    while engine.has_unfinished_requests():
        engine.step()
    return rate


def hf_model(model_dir: str, device):
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16,
                                                              attn_implementation="sdpa").to(device)
    return model.eval()


def hf_generate(model, prompts: list[list[int]], max_tokens: int, device) -> None:
    width = max(len(p) for p in prompts)
    pad = 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                       do_sample=False, pad_token_id=pad)


def hf_single(model, prompt: list[int], max_tokens: int, device) -> tuple[float, float]:
    start = time.perf_counter()
    hf_generate(model, [prompt], 1, device)
    sync(device)
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    hf_generate(model, [prompt], max_tokens, device)
    sync(device)
    total = time.perf_counter() - start
    return ttft, (max_tokens - 1) / max(total - ttft, 1e-9)


def median_time(fn, reps: int, device) -> float:
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--device", default="cuda")
    p.add_argument("--only", default="single,prefill,batch,offline")
    p.add_argument("--kv-blocks", type=int, default=12000, help="KV-cache blocks of 16 tokens per engine")
    p.add_argument("--quick", action="store_true", help="small workloads (to check the script)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA GPU here. Nothing to do.")
        return 0
    if args.random_weights and not any(f.endswith(".safetensors") for f in os.listdir(args.model_dir)):
        write_random_weights(args.model_dir)
    with open(os.path.join(args.model_dir, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    only = set(args.only.split(","))
    q = args.quick
    new_tokens = 16 if q else 256
    res: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                 "torch": torch.__version__}
    print(f"device: {res['device']}  torch {torch.__version__}", flush=True)

    engines = {"lamina": lamina_engine(args, eager=False), "lamina-eager": lamina_engine(args, eager=True)}
    hf = hf_model(args.model_dir, device)
    prompt48 = prompts_of(vocab, [48], seed=1)[0]

    if "single" in only:
        res["single"] = {}
        for name, engine in engines.items():
            lamina_single(engine, prompt48, 8, device)  # warm-up
            runs = [lamina_single(engine, prompt48, new_tokens, device) for _ in range(3)]
            res["single"][name] = {"ttft_ms": statistics.median(r[0] for r in runs) * 1e3,
                                   "decode_tok_s": statistics.median(r[1] for r in runs)}
        hf_single(hf, prompt48, 4, device)
        runs = [hf_single(hf, prompt48, new_tokens, device) for _ in range(3)]
        res["single"]["transformers"] = {"ttft_ms": statistics.median(r[0] for r in runs) * 1e3,
                                         "decode_tok_s": statistics.median(r[1] for r in runs)}
        print("single", json.dumps(res["single"]), flush=True)

    if "prefill" in only:
        n = 64 if q else 512
        res["prefill"] = {}
        for name, engine in engines.items():
            seeds = iter(range(100, 200))  # a new prompt each time: no prefix-cache hit

            def one():
                lamina_single(engine, prompts_of(vocab, [n], seed=next(seeds))[0], 1, device)
            one()
            res["prefill"][name] = {"tok_s": n / median_time(one, 5, device)}
        ids = torch.tensor([prompts_of(vocab, [n], seed=3)[0]], device=device)

        def hf_forward():
            with torch.inference_mode():
                hf(input_ids=ids, logits_to_keep=1).logits.argmax(-1)
        hf_forward()
        res["prefill"]["transformers"] = {"tok_s": n / median_time(hf_forward, 5, device)}
        print("prefill", json.dumps(res["prefill"]), flush=True)

    if "batch" in only:
        res["batch"] = {}
        for name, engine in engines.items():
            for b in ([1, 4] if q else [1, 8, 32, 128, 256]):
                rate = lamina_batch_decode(engine, b, 32 if q else 256, 8 if q else 32, vocab, device)
                res["batch"].setdefault(str(b), {})[name] = rate
        print("batch", json.dumps(res["batch"]), flush=True)

    if "offline" in only:
        count, lo, hi, gen = (16, 16, 64, 8) if q else (256, 16, 512, 64)
        prompts = mixed_prompts(vocab, count, lo, hi, seed=0)
        batch = 32
        batches = [[prompts[i] for i in b] for b in batches_by_length(prompts, batch)]
        res["offline"] = {"prompts": count, "prompt_tokens": sum(map(len, prompts)), "max_tokens": gen,
                          "hf_padded_prompt_tokens": padded_tokens(prompts, batches_by_length(prompts, batch))}
        params = SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True)
        engine = engines["lamina"]

        def lamina_all():
            for i, pr in enumerate(prompts):
                engine.add_request(f"o{time.monotonic_ns()}-{i}", {"prompt_token_ids": pr}, params)
            while engine.has_unfinished_requests():
                engine.step()
        t = median_time(lamina_all, 2, device)
        res["offline"]["lamina"] = {"out_tok_s": count * gen / t, "seconds": t}

        def hf_all():
            for b in batches:
                hf_generate(hf, b, gen, device)
        hf_generate(hf, batches[0], 2, device)
        t = median_time(hf_all, 1, device)
        res["offline"]["transformers"] = {"out_tok_s": count * gen / t, "seconds": t, "batch": batch,
                                          "sorted_by_length": True}
        print("offline", json.dumps(res["offline"]), flush=True)

    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    del engines, hf
    gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
