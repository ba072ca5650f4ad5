#!/usr/bin/env python3
"""What speculative decoding buys on one stream: lamina plain, with n-gram drafts, and with its own
int4 copy as the draft model, on copy-heavy chats (repeat or edit a given text or code) and on
ordinary chats, the three engines in this process, requests interleaved prompt by prompt.

    python bench/speculative.py                  # 3 rounds, k = 4
    python bench/speculative.py --rounds 5 --k 6 --max-tokens 256

Each engine is the README's default (compiled CPU steps, awaited before timing). A request is one
greedy chat of up to --max-tokens tokens. Each prompt is run by the three engines back to back, the
order rotating from prompt to prompt, so a ratio compares runs seconds apart. A workload's speed in
a round is its output tokens over its wall time (prefill included), and its decoding speed the
tokens after each request's first over the time after it (the first token is the prompt's forward
pass, the same work with or without drafts); a number is the median over rounds, and each ratio is
taken per round. The engines give the same tokens up to the numerics of a
verify step (noted where not), so a ratio is speed alone.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from common import OUT_DIR, fmt_spread, log, round_ratios, spread  # noqa: E402

PARAGRAPH = ("The lighthouse keeper climbed the spiral stairs every evening at dusk. He trimmed the wick, "
             "polished the great lens until it shone, and wound the clockwork that turned the light. Ships "
             "far out at sea saw the beam sweep across the water once every ten seconds, and knew where the "
             "rocks were. In winter the storms came in from the west, and the keeper would stay awake all "
             "night, listening to the waves break against the foot of the tower.")
CODE = '''def merge_sorted(a, b):
    out = []
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            out.append(a[i])
            i += 1
        else:
            out.append(b[j])
            j += 1
    out.extend(a[i:])
    out.extend(b[j:])
    return out
'''
COPY = [f"Repeat the following text exactly, word for word:\n\n{PARAGRAPH}",
        f"Rewrite this function with the variable `out` renamed to `result`. Reply with the code only.\n\n{CODE}",
        f"Here is a paragraph:\n\n{PARAGRAPH}\n\nCopy it out again, changing 'keeper' to 'guardian'."]
ORDINARY = ["What are three good habits for staying healthy?", "Explain how a rainbow forms.",
            "Write a short story about a cat who learns to fly."]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=common.DEFAULT_MODEL)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--out", default=os.path.join(OUT_DIR, "speculative.json"))
    args = p.parse_args()

    from lamina import LLM, SamplingParams
    engines = {"plain": LLM(args.model),
               "ngram": LLM(args.model, speculative_config={"method": "ngram", "num_speculative_tokens": args.k}),
               "int4-draft": LLM(args.model, speculative_config={"method": "draft_model", "quantization": "int4",
                                                                 "num_speculative_tokens": args.k})}
    for llm in engines.values():
        llm.wait_until_compiled()
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    workloads = {"copy": COPY, "ordinary": ORDINARY}
    tokens: dict[str, list[int]] = {}   # this prompt's, by engine
    common.wait_for_idle("the speculative-decoding bench")

    # Each prompt is run by every engine back to back, the order rotating from prompt to prompt, so
    # the host's drift (up to 2x within minutes here) falls on all engines alike.
    names = list(engines)
    runs = {(n, w, r): [0, 0.0, 0, 0, 0, 0.0] for n in names for w in workloads for r in range(args.rounds)}
    turn = 0
    for r in range(args.rounds):
        for workload, prompts in workloads.items():
            for prompt in prompts:
                k = turn % len(names)
                turn += 1
                for name in names[k:] + names[:k]:
                    t = time.perf_counter()
                    res = engines[name].chat([{"role": "user", "content": prompt}], params, use_tqdm=False)[0]
                    # tokens, seconds, drafted, accepted; then tokens and seconds after the first token
                    run, m = runs[name, workload, r], res.metrics
                    run[0] += len(res.token_ids)
                    run[1] += time.perf_counter() - t
                    run[2] += m.spec_drafted
                    run[3] += m.spec_accepted
                    run[4] += len(res.token_ids) - 1
                    run[5] += m.finished_time - m.first_token_time
                    tokens[name] = res.token_ids
                for name in names[1:]:
                    if tokens[name] != tokens[names[0]]:
                        log(f"note: {name} gave other tokens than {names[0]} for a {workload} prompt "
                            f"(the numerics of a verify step)")
            log(f"round {r} {workload}: " + ", ".join(
                f"{n} {runs[n, workload, r][0] / runs[n, workload, r][1]:.1f} tok/s" for n in names))
    rounds = {n: [{w: {"tok_per_s": runs[n, w, r][0] / runs[n, w, r][1], "drafted": runs[n, w, r][2],
                       "accepted": runs[n, w, r][3], "decode_tok_per_s": runs[n, w, r][4] / runs[n, w, r][5]}
                   for w in workloads} for r in range(args.rounds)]
              for n in names}
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    result = {"cpu": cpu, "threads": os.cpu_count(), "k": args.k, "max_tokens": args.max_tokens, "workloads": {}}
    for workload in workloads:
        plain = [rd[workload]["tok_per_s"] for rd in rounds["plain"]]
        plain_decode = [rd[workload]["decode_tok_per_s"] for rd in rounds["plain"]]
        result["workloads"][workload] = {"plain_tok_per_s": spread(plain), "plain_decode_tok_per_s": spread(plain_decode)}
        print(f"{workload}: plain {fmt_spread(spread(plain), ' tok/s', 1)}, decoding {fmt_spread(spread(plain_decode), ' tok/s', 1)}")
        for name in ("ngram", "int4-draft"):
            spec = [rd[workload]["tok_per_s"] for rd in rounds[name]]
            decode = [rd[workload]["decode_tok_per_s"] for rd in rounds[name]]
            drafted = sum(rd[workload]["drafted"] for rd in rounds[name])
            accepted = sum(rd[workload]["accepted"] for rd in rounds[name])
            w = result["workloads"][workload][name] = {
                "tok_per_s": spread(spec), "ratio": round_ratios(spec, plain),
                "decode_tok_per_s": spread(decode), "decode_ratio": round_ratios(decode, plain_decode),
                "drafted": drafted, "accepted": accepted, "acceptance_rate": accepted / drafted if drafted else None}
            print(f"  {name}: {fmt_spread(w['tok_per_s'], ' tok/s', 1)}, {name} / plain {fmt_spread(w['ratio'])}; "
                  f"decoding {fmt_spread(w['decode_ratio'])}; acceptance {accepted}/{drafted}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
