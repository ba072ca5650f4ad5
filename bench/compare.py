"""Two lamina checkouts, one run: single-stream decode and 512-token prefill, in interleaved rounds.

What a change does to speed, measured the way the suite measures systems (bench/README.md,
"Rounds"): each checkout runs in its own worker process (its own bench/workers.py, so its own
lamina), loaded once; every round measures both, alternating which goes first; each ratio is the
median of the per-round ratios, with its range.

    git worktree add ../lamina-base HEAD~3
    python bench/compare.py --base ../lamina-base                # bf16, compiled steps
    python bench/compare.py --base ../lamina-base --quantization int4 --rounds 5
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import REPO_DIR, Worker, fmt_spread, median, round_ratios  # noqa: E402



def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the other lamina checkout (a git worktree)")
    ap.add_argument("--model", default=common.DEFAULT_MODEL)
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--eager", action="store_true", help="no compiled steps in either")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--gen", type=int, default=128, help="decode: tokens generated after a 48-token prompt")
    ap.add_argument("--prefill-len", type=int, default=512)
    args = ap.parse_args(argv)
    tasks = {"decode tok/s": ("decode_tps", dict(prompt_len=48, gen=args.gen)),
             f"prefill tok/s ({args.prefill_len})": ("prefill_tps", dict(prompt_len=args.prefill_len, gen=1))}
    model_dir = common.model_dir(args.model)
    worker_args = ["--engine", "lamina", "--model-dir", model_dir, "--threads", str(args.threads)]
    worker_args += ["--quantization", args.quantization] if args.quantization else []
    worker_args += ["--eager"] if args.eager else []
    checkouts = {"this": REPO_DIR, "base": os.path.abspath(args.base)}
    results: dict[str, dict[str, list[float]]] = {name: {t: [] for t in tasks} for name in checkouts}
    workers = {name: Worker(worker_args + ["--name", name], repo=repo) for name, repo in checkouts.items()}
    try:
        for name, w in workers.items():
            if not w.ok:
                print(f"{name}: {w.ready['error']}")
                return 1
        for r in range(args.rounds):
            order = list(workers) if r % 2 == 0 else list(workers)[::-1]
            for name in order:
                for task, (key, params) in tasks.items():
                    out = workers[name].call("latency", seeds=[100 * r + 1], warmup_seed=100 * r + 50,
                                             warmup_tokens=8, **params)
                    if "error" in out:
                        print(f"{name}: {out['error']}")
                        return 1
                    results[name][task].append(out[key])
    finally:
        for w in workers.values():
            w.close()
    print(f"this {REPO_DIR} against base {checkouts['base']}; {args.rounds} interleaved rounds, "
          f"quantization {args.quantization or 'none'}, {'eager' if args.eager else 'compiled'} steps")
    for task in tasks:
        a, b = results["this"][task], results["base"][task]
        print(f"  {task:<20} this {median(a):8.1f}  base {median(b):8.1f}  this/base {fmt_spread(round_ratios(a, b))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
