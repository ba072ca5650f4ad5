"""What batch-invariant mode costs: lamina's throughput with and without it, on the same prompts.

    python bench/batch_invariant.py              # 5 rounds: single-stream decode and 32 mixed prompts
    python bench/batch_invariant.py --threads 1  # steadier where other processes share the cores
    python bench/batch_invariant.py --quick      # a smoke run

Three engines of the same model in one process, each loaded once: `default` (compiled steps, timed
once they are compiled), `default-eager` (--enforce-eager: the same execution path as the mode,
so the difference is the kernels alone) and `batch-invariant`. Workloads, all greedy with EOS
ignored and the prefix cache off (every round computes everything):
    decode   one 128-token prompt, 64 new tokens: output tokens/s
    batch    32 prompts of 16-256 tokens, 32 new tokens each, through LLM.generate: output tokens/s
Each round runs every engine on both workloads back to back, the order rotating (common.interleave);
round r uses prompts of seed r. Numbers are medians over rounds with their range; ratios are medians
of the per-round ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from common import OUT_DIR, fmt_spread, interleave, log, mixed_prompts, round_ratios, spread  # noqa: E402

WORKLOADS = ("decode", "batch")
MODES = {"default": dict(), "default-eager": dict(enforce_eager=True), "batch-invariant": dict(batch_invariant=True)}


def workloads(vocab: int, quick: bool, seed: int) -> dict:
    if quick:
        return {"decode": ([common.random_prompt(vocab, 32, seed)], 16),
                "batch": (mixed_prompts(vocab, 8, 16, 64, seed=seed), 8)}
    return {"decode": ([common.random_prompt(vocab, 128, seed)], 64),
            "batch": (mixed_prompts(vocab, 32, 16, 256, seed=seed), 32)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=common.DEFAULT_MODEL)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--compile-timeout", type=float, default=900, help="seconds to wait for compiled steps")
    ap.add_argument("--out", default=None, help="output stem (default: bench/out/batch-invariant-<time>)")
    args = ap.parse_args()
    from lamina import LLM, SamplingParams

    model = common.model_dir(args.model)
    vocab = common.vocab_size(model)
    modes = args.modes.split(",")
    engines = {}
    for mode in modes:
        llm = LLM(model, enable_prefix_caching=False, kv_cache_memory=1 << 30, num_threads=args.threads,
                  **MODES[mode])
        if not llm.wait_until_compiled(args.compile_timeout):
            log(f"{mode}: compiled steps not ready after {args.compile_timeout} s; timing what serves now")
        engines[mode] = llm
    log(f"engines ready: {', '.join(modes)}")

    def measure(mode: str, r: int) -> dict:
        out = {}
        for name, (prompts, max_tokens) in workloads(vocab, args.quick, seed=r).items():
            params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
            with common.OthersMeter() as others:
                started = time.perf_counter()
                results = engines[mode].generate(prompts, params, use_tqdm=False)
                seconds = time.perf_counter() - started
            out[name] = sum(len(o.outputs[0].token_ids) for o in results) / seconds
            out[f"{name} others"] = others.fraction   # the CPUs other processes kept busy meanwhile
        log(f"round {r} {mode}: " + ", ".join(f"{k} {v:.2f}" for k, v in out.items() if v is not None))
        return out

    for mode in modes:      # a warm-up of each workload, not timed
        measure(mode, -1)
    runs = interleave(modes, args.rounds, measure)
    report = {"model": args.model, "rounds": args.rounds, "quick": args.quick, "threads": os.cpu_count(),
              "tok_s": {m: {w: spread([r[w] for r in runs[m]]) for w in WORKLOADS} for m in modes},
              "others_busy": spread([r[f"{w} others"] for m in modes for r in runs[m] for w in WORKLOADS]),
              "ratios": {}}
    if "batch-invariant" in runs:
        for base in (m for m in modes if m != "batch-invariant"):
            report["ratios"][f"batch-invariant / {base}"] = {
                w: round_ratios([r[w] for r in runs["batch-invariant"]], [r[w] for r in runs[base]])
                for w in WORKLOADS}
    stem = args.out or os.path.join(OUT_DIR, f"batch-invariant-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump({**report, "runs": runs}, f, indent=1)
    print("\n| mode | decode tok/s | batch of 32 tok/s |\n|---|---|---|")
    for m in modes:
        t = report["tok_s"][m]
        print(f"| {m} | {fmt_spread(t['decode'], '', 1)} | {fmt_spread(t['batch'], '', 1)} |")
    for name, ratio in report["ratios"].items():
        print(f"| {name} | {fmt_spread(ratio['decode'])} | {fmt_spread(ratio['batch'])} |")
    busy = report["others_busy"]
    if busy:
        print(f"\nother processes kept {busy['median']:.0%} of the CPUs busy "
              f"(median; {busy['min']:.0%}-{busy['max']:.0%})")
    print(f"written {stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
