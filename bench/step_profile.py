"""Where an offline run's time goes: every `engine.step()` of the offline workload timed by kind,
then torch's profiler around one prefill step, ops grouped by input shape (packed GEMMs with their
GFLOP/s, to hold against the machine's matmul peak).

    python bench/step_profile.py                   # the offline set: 256 prompts of 16-512 tokens
    python bench/step_profile.py --prompts 16 --max-tokens 8 --step-tokens 1024   # a quick look

The prompts are bench/offline.py's first round's set (bench/common.py's mixed_prompts, seed 0:
random token ids of 16..512 tokens; 64 new tokens each, greedy, EOS ignored), all submitted at once
to one `LLM` as `LLM.generate` would; prefill steps hold up to --step-tokens prompt tokens (LLM's
max_num_batched_tokens).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import DEFAULT_MODEL, mixed_prompts  # noqa: E402
from lamina import LLM, SamplingParams  # noqa: E402


def as_requests(prompts: list[list[int]]) -> list[dict]:
    return [{"prompt_token_ids": p} for p in prompts]


def time_steps(llm: LLM, batch: list[dict], params: SamplingParams) -> dict:
    """Run the batch step by step; each step's time, by kind (prompt tokens only, with decodes, decodes only)."""
    engine, steps = llm.engine, []
    schedule = engine.scheduler.schedule

    def recorded(*a, **k):
        b = schedule(*a, **k)
        steps.append((b.num_tokens - b.num_decode, b.num_decode, time.perf_counter()))
        return b

    engine.scheduler.schedule = recorded
    try:
        t0 = time.perf_counter()
        for p in batch:
            engine.add_request(None, p, params)
        while engine.has_unfinished_requests():
            engine.step()
        total = time.perf_counter() - t0
    finally:
        engine.scheduler.schedule = schedule
    ends = [s[2] for s in steps[1:]] + [t0 + total]
    kinds = {"prefill": [0, 0.0, 0], "mixed": [0, 0.0, 0], "decode": [0, 0.0, 0]}  # steps, seconds, tokens
    for (prompt, decode, start), end in zip(steps, ends):
        kind = "mixed" if prompt and decode else "prefill" if prompt else "decode"
        kinds[kind][0] += 1
        kinds[kind][1] += end - start
        kinds[kind][2] += prompt + decode
    return {"total_s": total, "output_tokens": len(batch) * params.max_tokens, "kinds": kinds}


def profile_prefill(llm: LLM, batch: list[dict]) -> list[str]:
    """One prefill step's ops (max_tokens=1: the prompts and one sampled token)."""
    from torch.profiler import profile
    with profile(record_shapes=True) as prof:
        llm.generate(batch, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    events = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    lines = ["| op | input shapes | calls | ms | % | GFLOP/s |", "|---|---|---:|---:|---:|---:|"]
    for e in events[:8]:
        shapes = e.input_shapes or []
        gflops = ""
        if e.key.startswith("lamina::bf16_packed") and len(shapes) > 1 and shapes[0] and shapes[1]:
            m, (blocks, pairs) = shapes[0][0], shapes[1][:2]
            gflops = f"{2 * m * blocks * 16 * pairs * 2 * e.count / e.self_cpu_time_total / 1e3:.0f}"
        lines.append(f"| {e.key[:48]} | {str(shapes)[:60]} | {e.count} | {e.self_cpu_time_total / 1e3:.0f} "
                     f"| {100 * e.self_cpu_time_total / total:.0f} | {gflops} |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="a registry name or a model directory")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--step-tokens", type=int, default=8192, help="prompt tokens per step (default %(default)s)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--no-profile", action="store_true", help="step times only")
    args = ap.parse_args()
    # the default KV budget (4 GiB on CPU) holds the default set's 256 sequences at once
    llm = LLM(args.model, num_threads=args.threads, max_num_batched_tokens=args.step_tokens)
    vocab = llm.engine.model_config.vocab_size
    warm_up = as_requests(mixed_prompts(vocab, 4, args.min_len, args.max_len, seed=424242))
    llm.generate(warm_up, SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    r = time_steps(llm, as_requests(mixed_prompts(vocab, args.prompts, args.min_len, args.max_len, seed=0)), params)
    print(f"{args.prompts} prompts, {args.max_tokens} new tokens each: {r['total_s']:.1f} s, "
          f"{r['output_tokens'] / r['total_s']:.1f} output tok/s")
    print("| steps | count | seconds | tokens | tok/s |\n|---|---:|---:|---:|---:|")
    for kind, (count, seconds, tokens) in r["kinds"].items():
        print(f"| {kind} | {count} | {seconds:.1f} | {tokens} | {tokens / seconds if seconds else 0:.0f} |")
    if not args.no_profile:
        # prompts outside the measured set (so none hits the prefix cache), up to one step's budget
        budget, batch = args.step_tokens, []
        extra = mixed_prompts(vocab, args.step_tokens // max(args.min_len, 1) + 1, args.min_len, args.max_len,
                              seed=777)
        for p in as_requests(extra):
            if batch and sum(len(b["prompt_token_ids"]) for b in batch) + len(p["prompt_token_ids"]) > budget:
                break
            batch.append(p)
        print(f"\none prefill step: {len(batch)} prompts, {sum(len(b['prompt_token_ids']) for b in batch)} tokens")
        print("\n".join(profile_prefill(llm, batch)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
