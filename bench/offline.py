"""Offline throughput: many prompts of mixed lengths through lamina's `LLM.generate` at once
(continuous batching), against the same prompts one at a time, against transformers' batched
`generate` on the same weights, and (when built) llama.cpp's llama-server with all its slots busy.

    python bench/offline.py                       # 256 prompts of 16-512 tokens, 64 new tokens each
    python bench/offline.py --quick               # 16 prompts of 16-128 tokens, 16 new tokens each
    python bench/offline.py --systems lamina,lamina-serial --lamina-dtype float32

Every system gets the same prompt token ids (fixed seed) and generates exactly --max-tokens tokens
per prompt (greedy, EOS ignored), each in its own process. Throughput is output tokens/s and
total (prompt + output) tokens/s over the wall time of the whole set.

One-at-a-time: running all prompts serially takes far too long, so `lamina-serial` runs a subset
(--serial-subset prompts spread evenly over the length distribution) and reports that subset's
rate; the estimated time for the whole set is the subset's mean time per prompt x the number of
prompts, and is labelled as an estimate.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from common import (OUT_DIR, have_module, kv_bytes_per_token, llama_bin, log, mixed_prompts,  # noqa: E402
                    model_dir, run_worker, vocab_size, wait_for_idle)

OFFLINE_SYSTEMS = ("lamina", "lamina-serial", "hf", "llamacpp-server")


def default_config(quick: bool) -> dict:
    if quick:
        return {"num_prompts": 16, "min_len": 16, "max_len": 128, "max_tokens": 16, "serial_subset": 2,
                "hf_batch_size": 8}
    return {"num_prompts": 256, "min_len": 16, "max_len": 512, "max_tokens": 64, "serial_subset": 8,
            "hf_batch_size": 32}


def serial_subset(prompts: list[list[int]], k: int) -> list[list[int]]:
    """k prompts at evenly spaced quantiles of prompt length (shortest to longest)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    if k >= len(prompts):
        return [prompts[i] for i in order]
    picks = [order[round(j * (len(order) - 1) / max(k - 1, 1))] for j in range(k)]
    return [prompts[i] for i in picks]


def run_offline(model: str, systems: list[str], cfg: dict, lamina_dtype: str = "auto", hf_dtype: str = "bfloat16",
                threads: int | None = None, lamina_args: list[str] | None = None, llama_parallel: int = 32) -> dict:
    threads = threads or os.cpu_count()
    hf_dir = model_dir(model)
    prompts = mixed_prompts(vocab_size(hf_dir), cfg["num_prompts"], cfg["min_len"], cfg["max_len"], seed=0)
    n_prompt_tokens = sum(len(p) for p in prompts)
    result: dict = {"config": dict(cfg, lamina_dtype=lamina_dtype, hf_dtype=hf_dtype, threads=threads,
                                   prompt_tokens=n_prompt_tokens), "systems": {}}
    log(f"offline: {len(prompts)} prompts, {n_prompt_tokens} prompt tokens, {cfg['max_tokens']} new tokens each")

    tmpdir = tempfile.mkdtemp(prefix="lamina-offline-")
    all_path = os.path.join(tmpdir, "prompts.json")
    with open(all_path, "w") as f:
        json.dump(prompts, f)
    subset = serial_subset(prompts, cfg["serial_subset"])
    subset_path = os.path.join(tmpdir, "subset.json")
    with open(subset_path, "w") as f:
        json.dump(subset, f)

    # KV budget for lamina: room for every sequence at once (fp32 bytes, 10% slack), at least 1 GiB
    kv_tokens = n_prompt_tokens + len(prompts) * cfg["max_tokens"]
    kv_bytes = max(1 << 30, int(kv_tokens * kv_bytes_per_token(hf_dir, 4) * 1.1))
    base_args = ["--model-dir", hf_dir, "--threads", str(threads), "--max-tokens", str(cfg["max_tokens"])]
    lamina_common = ["--engine", "lamina", "--dtype", lamina_dtype, "--kv-cache-memory", str(kv_bytes),
                     *(lamina_args or [])]

    for name in systems:
        quiet = wait_for_idle(f"offline {name}")
        t0 = time.time()
        if name == "lamina":
            r = run_worker(["offline", *base_args, *lamina_common, "--name", "lamina", "--prompts", all_path])
            r["command"] = f"LLM(model, dtype={lamina_dtype!r}).generate(<{len(prompts)} prompts>, " \
                           f"SamplingParams(max_tokens={cfg['max_tokens']}, temperature=0, ignore_eos=True))"
        elif name == "lamina-serial":
            r = run_worker(["offline", *base_args, *lamina_common, "--name", "lamina-serial", "--serial",
                            "--prompts", subset_path])
            if "error" not in r:
                r["subset_of"] = len(prompts)
                r["estimated_elapsed_s_all"] = r["elapsed_s"] / len(subset) * len(prompts)
                r["estimated"] = True
            r["command"] = f"LLM(...).generate(one prompt) for {len(subset)} of the {len(prompts)} prompts " \
                           f"(length quantiles), rate extrapolated"
        elif name == "hf":
            if not have_module("transformers"):
                log("offline: transformers not installed, skipping hf")
                continue
            r = run_worker(["offline", *base_args, "--engine", "hf", "--dtype", hf_dtype, "--name", f"hf-{hf_dtype}",
                            "--batch-size", str(cfg["hf_batch_size"]), "--prompts", all_path])
            r["command"] = f"AutoModelForCausalLM.from_pretrained(dir, dtype=torch.{hf_dtype}, " \
                           f"attn_implementation='sdpa').generate(<batches of {cfg['hf_batch_size']}, left padding>, " \
                           f"max_new_tokens={cfg['max_tokens']}, min_new_tokens={cfg['max_tokens']}, do_sample=False)"
        elif name == "llamacpp-server":
            from llamacpp import LlamaServer, offline_via_server
            gguf = os.path.join(hf_dir, "source.gguf")
            if not llama_bin("llama-server") or not os.path.exists(gguf):
                log("offline: llama-server not built (bash bench/build_llamacpp.sh), skipping")
                continue
            parallel = min(llama_parallel, len(prompts))
            ctx = parallel * (cfg["max_len"] + cfg["max_tokens"] + 16)
            try:
                with common.OthersMeter() as meter, LlamaServer(gguf, parallel=parallel, threads=threads, ctx=ctx,
                                                                log_name="llama-server-offline.log") as srv:
                    r = offline_via_server(srv.port, prompts, cfg["max_tokens"], concurrency=parallel)
                    r["command"] = srv.command + f"  +  {parallel} concurrent POST /completion " \
                                                 f"(n_predict={cfg['max_tokens']}, ignore_eos, cache_prompt=false)"
                r["others_cpu_during"] = meter.fraction
            except RuntimeError as e:
                r = {"error": str(e)}
        else:
            raise SystemExit(f"unknown offline system {name!r}; choose from {', '.join(OFFLINE_SYSTEMS)}")
        r["wall_s"] = round(time.time() - t0, 1)
        r.update(quiet)
        result["systems"][name] = r
        if "error" in r:
            log(f"offline {name}: {r['error']}")
        else:
            log(f"offline {name}: {r['output_tps']:.1f} output tok/s, {r['total_tps']:.1f} total tok/s "
                f"({r['elapsed_s']:.1f}s)")

    s = result["systems"]
    lam = s.get("lamina", {})
    ratios = {}
    if "output_tps" in lam:
        for other in ("lamina-serial", "hf", "llamacpp-server"):
            if "output_tps" in s.get(other, {}):
                ratios[f"lamina / {other}"] = lam["output_tps"] / s[other]["output_tps"]
    result["ratios_output_tps"] = ratios
    return result


def markdown(res: dict) -> str:
    cfg = res["config"]
    lines = [f"Offline: {cfg['num_prompts']} prompts of {cfg['min_len']}-{cfg['max_len']} tokens "
             f"({cfg['prompt_tokens']} prompt tokens), {cfg['max_tokens']} new tokens each, greedy, EOS ignored.",
             "", "| system | output tok/s | total tok/s | wall time (s) | lamina / system |",
             "|---|---:|---:|---:|---:|"]
    lam = res["systems"].get("lamina", {}).get("output_tps")
    for name, r in res["systems"].items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error'][:80]} | | | |")
            continue
        label = name
        elapsed = f"{r['elapsed_s']:.1f}"
        if r.get("estimated"):
            label += f" ({len(r.get('per_prompt', [])) or '?'} of {r['subset_of']} prompts, extrapolated)"
            elapsed = f"≈{r['estimated_elapsed_s_all']:.0f} (est. for all)"
        ratio = f"{lam / r['output_tps']:.2f}x" if lam and name != "lamina" else ""
        b = max(r.get("cpu_busy_before") or 0, r.get("others_cpu_during") or 0)
        if b > common.BUSY_THRESHOLD:
            label += f" ⚠{b:.0%}"
        lines.append(f"| {label} | {r['output_tps']:.1f} | {r['total_tps']:.1f} | {elapsed} | {ratio} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--systems", default="lamina,lamina-serial,hf,llamacpp-server",
                    help=f"comma-separated, from {', '.join(OFFLINE_SYSTEMS)} (default: %(default)s)")
    ap.add_argument("--quick", action="store_true", help="a small smoke run")
    ap.add_argument("--num-prompts", type=int)
    ap.add_argument("--min-len", type=int)
    ap.add_argument("--max-len", type=int)
    ap.add_argument("--max-tokens", type=int)
    ap.add_argument("--serial-subset", type=int, help="prompts run one at a time for lamina-serial")
    ap.add_argument("--hf-batch-size", type=int)
    ap.add_argument("--lamina-dtype", default="auto")
    ap.add_argument("--hf-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--wait-idle", type=float, default=120.0,
                    help="wait up to this many seconds for a quiet machine before each system (default: %(default)s)")
    ap.add_argument("--json", default=None, help="write the result here (default: bench/out/offline-<time>.json)")
    args = ap.parse_args()
    common.WAIT_IDLE_S = args.wait_idle
    cfg = default_config(args.quick)
    for key in cfg:
        if getattr(args, key, None) is not None:
            cfg[key] = getattr(args, key)
    res = run_offline(args.model, [s for s in args.systems.split(",") if s], cfg, args.lamina_dtype, args.hf_dtype,
                      args.threads)
    os.makedirs(OUT_DIR, exist_ok=True)
    path = args.json or os.path.join(OUT_DIR, f"offline-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(markdown(res))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
