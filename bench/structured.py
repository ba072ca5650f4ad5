#!/usr/bin/env python3
"""What structured outputs cost: lamina serving 16 concurrent streams with every request held to a
JSON schema, against the same load unconstrained, in one server, rounds interleaved; and how long a
schema takes to compile, cold and cached.

    python bench/structured.py                 # 3 rounds
    python bench/structured.py --rounds 5 --concurrency 16 --max-tokens 128

Both loads send chat requests of ~100 words with max_tokens tokens at temperature 0.7; the free one
sets ignore_eos (every answer is max_tokens long), the constrained one asks for a list of records
long enough that its answers are too (they end when the schema's JSON is complete). Throughput is
output tokens per second of the whole level (bench/serve.py); the ratio is taken within each round.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import serve  # noqa: E402
from common import (OUT_DIR, fmt_spread, free_port, interleave, launch, log, model_dir, round_ratios,  # noqa: E402
                    spread, stop, wait_compiled, wait_health)

RECORDS = {"type": "object", "properties": {"records": {"type": "array", "minItems": 12, "maxItems": 12, "items": {
    "type": "object", "properties": {"word": {"type": "string", "maxLength": 12},
                                     "count": {"type": "integer", "minimum": 0, "maximum": 999}},
    "required": ["word", "count"], "additionalProperties": False}}},
    "required": ["records"], "additionalProperties": False}


def compile_times(model: str, schemas: int = 20) -> dict:
    """Seconds to compile a schema the engine has not seen (each a different property name), and to
    find one it has; plus the one-time cost of reading the tokenizer into the grammar engine."""
    from lamina.engine.grammar import GrammarCompiler
    from lamina.sampling_params import StructuredOutputs
    from lamina.tokenizer import Tokenizer
    tok = Tokenizer(model_dir(model))
    compiler = GrammarCompiler(tok.to_json(), tok.vocab_size, [tok.eos_token_id])
    t = time.perf_counter()
    compiler.compile(StructuredOutputs(json_object=True)).result()
    first = time.perf_counter() - t
    cold, cached = [], []
    for i in range(schemas):
        schema = json.loads(json.dumps(RECORDS).replace('"word"', f'"word{i}"'))
        t = time.perf_counter()
        compiler.compile(StructuredOutputs(json=schema)).result()
        cold.append(time.perf_counter() - t)
        t = time.perf_counter()
        compiler.compile(StructuredOutputs(json=schema)).result()
        cached.append(time.perf_counter() - t)
    compiler.close()
    return {"first_with_tokenizer_s": first, "cold_s": spread(cold), "cached_s": spread(cached)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=common.DEFAULT_MODEL)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=32, help="requests per load per round")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--out", default=os.path.join(OUT_DIR, "structured.json"))
    args = p.parse_args()

    compile_stats = compile_times(args.model)
    log(f"schema compile: cold {compile_stats['cold_s']['median'] * 1e3:.2f} ms, cached "
        f"{compile_stats['cached_s']['median'] * 1e6:.1f} us, first (with the tokenizer) "
        f"{compile_stats['first_with_tokenizer_s']:.2f} s")
    common.wait_for_idle("the structured-outputs bench")
    port = free_port()
    log_path = os.path.join(OUT_DIR, "structured-serve.log")
    proc = launch([sys.executable, "-m", "lamina", "serve", "--model", args.model, "--port", str(port)], log_path)
    try:
        if not wait_health(port, proc, 600):
            sys.exit(f"the server did not start; see {log_path}")
        log(f"background compile: {wait_compiled(log_path, proc, 900)}")
        base = f"http://127.0.0.1:{port}/v1"
        fmt = {"response_format": {"type": "json_schema", "json_schema": {"name": "records", "schema": RECORDS}}}
        loads = {"free": [], "json_schema": []}

        def measure(name, r):
            argv = ["--base-url", base, "--model", args.model, "--levels", str(args.concurrency),
                    "--num-requests", str(args.requests), "--max-tokens", str(args.max_tokens),
                    "--temperature", "0.7", "--seed", str(r), "--out", os.devnull]
            if name == "json_schema":
                argv += ["--extra-body", json.dumps(fmt), "--no-ignore-eos"]
            level = asyncio.run(serve.main_async(serve.parse_args(argv)))["levels"][0]
            assert level["errors"] == 0, level["error_samples"]
            log(f"round {r} {name}: {level['output_tokens_per_s']:.1f} tok/s, "
                f"{level['output_tokens'] / level['completed']:.0f} tokens per answer")
            return level

        loads = interleave(list(loads), args.rounds, measure)
    finally:
        stop(proc)
    tps = {k: [lv["output_tokens_per_s"] for lv in v] for k, v in loads.items()}
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    result = {"cpu": cpu, "threads": os.cpu_count(),
              "concurrency": args.concurrency, "max_tokens": args.max_tokens, "compile": compile_stats,
              "tok_per_s": {k: spread(v) for k, v in tps.items()},
              "tokens_per_answer": {k: statistics.median(lv["output_tokens"] / lv["completed"] for lv in v)
                                    for k, v in loads.items()},
              "ratio_json_over_free": round_ratios(tps["json_schema"], tps["free"]), "levels": loads}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\n{args.concurrency} streams: free {fmt_spread(result['tok_per_s']['free'], ' tok/s', 1)}, "
          f"json_schema {fmt_spread(result['tok_per_s']['json_schema'], ' tok/s', 1)}")
    print(f"json_schema / free: {fmt_spread(result['ratio_json_over_free'])}")
    print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
