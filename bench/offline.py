"""Offline throughput: many prompts of mixed lengths through lamina's `LLM.generate` at once
(continuous batching), against the same prompts one at a time, against transformers' batched
`generate` on the same weights, and (when built) llama.cpp's llama-server with all its slots busy.

    python bench/offline.py                       # 256 prompts of 16-512 tokens, 64 new tokens each
    python bench/offline.py --quick               # 16 prompts of 16-128 tokens, 16 new tokens each
    python bench/offline.py --systems lamina,lamina-serial --lamina-dtype float32

Every system gets the same prompt token ids (fixed seed) and generates exactly --max-tokens tokens
per prompt (greedy, EOS ignored), each in its own process. Throughput is output tokens/s and
total (prompt + output) tokens/s over the wall time of the whole set.

Rounds (--rounds, default 3): each system is loaded once, then every round runs the whole set on
every system back to back, the order rotating (bench/common.py's interleave()). Round r uses the
prompt set of seed r (round 0 is the performance issue's set), the same for every system, so no
round is helped by a cache another round filled. Each number is the median over rounds with its
range; each ratio is the median of the per-round ratios with its range.

transformers gets the prompts sorted by length before they are cut into batches of
--hf-batch-size, as a careful user of a left-padded batch API does (the report gives the padded /
real prompt-token ratio, and what it would be unsorted); --hf-unsorted keeps their order.

One-at-a-time: running all prompts serially takes far too long, so `lamina-serial` runs a subset
(--serial-subset prompts spread evenly over the length distribution) and reports that subset's
rate; the estimated time for the whole set is the subset's mean time per prompt x the number of
prompts, and is labelled as an estimate.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from common import (OUT_DIR, Worker, fmt_spread, have_module, interleave, kv_bytes_per_token,  # noqa: E402
                    llama_bin, log, mixed_prompts, model_dir, round_ratios, spread, vocab_size, wait_for_idle)

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
                threads: int | None = None, lamina_args: list[str] | None = None, llama_parallel: int = 32,
                rounds: int = 3, hf_sort: bool = True) -> dict:
    threads = threads or os.cpu_count()
    hf_dir = model_dir(model)
    vocab = vocab_size(hf_dir)
    sets = [mixed_prompts(vocab, cfg["num_prompts"], cfg["min_len"], cfg["max_len"], seed=r) for r in range(rounds)]
    result: dict = {"config": dict(cfg, lamina_dtype=lamina_dtype, hf_dtype=hf_dtype, threads=threads, rounds=rounds,
                                   hf_sorted_by_length=hf_sort,
                                   prompt_tokens=[sum(len(p) for p in prompts) for prompts in sets]),
                    "systems": {}}
    log(f"offline: {rounds} rounds of {cfg['num_prompts']} prompts ({result['config']['prompt_tokens']} prompt "
        f"tokens), {cfg['max_tokens']} new tokens each")

    tmpdir = tempfile.mkdtemp(prefix="lamina-offline-")
    paths = []
    for r, prompts in enumerate(sets):
        paths.append({"all": os.path.join(tmpdir, f"prompts-{r}.json"), "subset": os.path.join(tmpdir, f"subset-{r}.json")})
        with open(paths[r]["all"], "w") as f:
            json.dump(prompts, f)
        with open(paths[r]["subset"], "w") as f:
            json.dump(serial_subset(prompts, cfg["serial_subset"]), f)

    # KV budget for lamina: room for every sequence at once (fp32 bytes, 10% slack), at least 1 GiB
    kv_tokens = max(result["config"]["prompt_tokens"]) + cfg["num_prompts"] * cfg["max_tokens"]
    kv_bytes = max(1 << 30, int(kv_tokens * kv_bytes_per_token(hf_dir, 4) * 1.1))
    base_args = ["--model-dir", hf_dir, "--threads", str(threads)]
    lamina_common = ["--engine", "lamina", "--dtype", lamina_dtype, *(lamina_args or [])]
    n, k = cfg["num_prompts"], min(cfg["serial_subset"], cfg["num_prompts"])
    commands = {
        "lamina": f"LLM(model, dtype={lamina_dtype!r}).generate(<{n} prompts>, "
                  f"SamplingParams(max_tokens={cfg['max_tokens']}, temperature=0, ignore_eos=True))",
        "lamina-serial": f"LLM(...).generate(one prompt) for {k} of the {n} prompts (length quantiles), rate "
                         f"extrapolated",
        "hf": f"AutoModelForCausalLM.from_pretrained(dir, dtype=torch.{hf_dtype}, attn_implementation='sdpa')"
              f".generate(<batches of {cfg['hf_batch_size']}, {'sorted by length, ' if hf_sort else ''}left padding>, "
              f"max_new_tokens={cfg['max_tokens']}, min_new_tokens={cfg['max_tokens']}, do_sample=False)",
    }

    # load every system once (a lamina worker waits for its background compile before it answers)
    workers: dict = {}
    server = None
    names = []
    for name in systems:
        if name not in OFFLINE_SYSTEMS:
            raise SystemExit(f"unknown offline system {name!r}; choose from {', '.join(OFFLINE_SYSTEMS)}")
        if name == "hf" and not have_module("transformers"):
            log("offline: transformers not installed, skipping hf")
            continue
        if name == "llamacpp-server":
            from llamacpp import LlamaServer
            gguf = os.path.join(hf_dir, "source.gguf")
            if not llama_bin("llama-server") or not os.path.exists(gguf):
                log("offline: llama-server not built (bash bench/build_llamacpp.sh), skipping")
                continue
            parallel = min(llama_parallel, n)
            server = LlamaServer(gguf, parallel=parallel, threads=threads,
                                 ctx=parallel * (cfg["max_len"] + cfg["max_tokens"] + 16),
                                 log_name="llama-server-offline.log")
            try:
                server.__enter__()
            except RuntimeError as e:
                result["systems"][name] = {"error": str(e)}
                server = None
                continue
            commands[name] = server.command + f"  +  {parallel} concurrent POST /completion " \
                                              f"(n_predict={cfg['max_tokens']}, ignore_eos, cache_prompt=false)"
        else:
            args = {"lamina": [*lamina_common, "--kv-cache-memory", str(kv_bytes)],
                    "lamina-serial": [*lamina_common, "--kv-cache-memory", str(1 << 30)],
                    "hf": ["--engine", "hf", "--dtype", hf_dtype]}[name]
            log(f"offline: loading {name}")
            w = Worker([*args, *base_args, "--name", name])
            if not w.ok:
                result["systems"][name] = {"error": w.ready["error"]}
                w.close()
                continue
            workers[name] = w
        names.append(name)

    def measure(name: str, r: int) -> dict:
        quiet = wait_for_idle(f"offline {name} round {r + 1}/{rounds}")
        t0 = time.time()
        if name == "llamacpp-server":
            from llamacpp import offline_via_server
            with common.OthersMeter(pids=[server.proc.pid]) as meter:  # the server's CPU is ours
                out = offline_via_server(server.port, sets[r], cfg["max_tokens"], concurrency=min(llama_parallel, n))
            out["others_cpu_during"] = meter.fraction
        else:
            serial = name == "lamina-serial"
            out = workers[name].call("offline", prompts=paths[r]["subset" if serial else "all"],
                                     max_tokens=cfg["max_tokens"], serial=serial, batch_size=cfg["hf_batch_size"],
                                     sort_by_length=hf_sort)
            if serial and "error" not in out:
                out["subset_of"] = n
                out["estimated_elapsed_s_all"] = out["elapsed_s"] / k * n
                out["estimated"] = True
        out.update(quiet, wall_s=round(time.time() - t0, 1), round=r)
        if "error" in out:
            log(f"offline {name} round {r + 1}: {out['error']}")
        else:
            log(f"offline {name} round {r + 1}: {out['output_tps']:.1f} output tok/s, {out['total_tps']:.1f} total "
                f"tok/s ({out['elapsed_s']:.1f}s)")
        return out

    try:
        per_round = interleave(names, rounds, measure)
    finally:
        for w in workers.values():
            w.close()
        if server:
            server.__exit__(None, None, None)
        shutil.rmtree(tmpdir, ignore_errors=True)

    for name, runs in per_round.items():
        ok = [x for x in runs if "error" not in x]
        if not ok:
            result["systems"][name] = {"error": runs[0]["error"] if runs else "no rounds", "rounds": runs}
            continue
        summary = {"output_tps": spread([x["output_tps"] for x in ok]), "total_tps": spread([x["total_tps"] for x in ok]),
                   "elapsed_s": spread([x["elapsed_s"] for x in ok]), "command": commands.get(name),
                   "cpu_busy_before": max(x.get("cpu_busy_before") or 0 for x in ok),
                   "others_cpu_during": max(x.get("others_cpu_during") or 0 for x in ok), "rounds": runs}
        for key in ("estimated", "subset_of", "pad_ratio", "pad_ratio_unsorted", "sorted_by_length"):
            if key in ok[0]:
                summary[key] = ok[0][key] if not isinstance(ok[0][key], float) else spread([x[key] for x in ok])
        if name in workers:
            summary["info"] = workers[name].ready.get("info")
        result["systems"][name] = summary

    lam = per_round.get("lamina")
    result["ratios_output_tps"] = {}
    if lam:
        for other in ("lamina-serial", "hf", "llamacpp-server"):
            if other in per_round:
                rr = round_ratios([x.get("output_tps") for x in lam], [x.get("output_tps") for x in per_round[other]])
                if rr:
                    result["ratios_output_tps"][f"lamina / {other}"] = rr
    return result


def markdown(res: dict) -> str:
    cfg = res["config"]
    rounds = cfg.get("rounds", 1)
    lines = [f"Offline: {cfg['num_prompts']} prompts of {cfg['min_len']}-{cfg['max_len']} tokens "
             f"({', '.join(str(t) for t in cfg['prompt_tokens'])} prompt tokens in the {rounds} rounds' sets), "
             f"{cfg['max_tokens']} new tokens each, greedy, EOS ignored. Median of {rounds} interleaved rounds "
             "(min–max).", "",
             "| system | output tok/s | total tok/s | wall time (s) | lamina / system (per-round ratios) |",
             "|---|---:|---:|---:|---:|"]

    def med(s: dict | None, digits: int = 1) -> str:
        if not s:
            return "–"
        if s["n"] < 2:
            return f"{s['median']:.{digits}f}"
        return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"

    for name, r in res["systems"].items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error'][:80]} | | | |")
            continue
        label = name
        elapsed = med(r["elapsed_s"])
        if r.get("estimated"):
            k = min(cfg["serial_subset"], r["subset_of"])
            label += f" ({k} of {r['subset_of']} prompts, extrapolated)"
            elapsed = f"≈{r['elapsed_s']['median'] / k * r['subset_of']:.0f} (est. for all)"
        ratio = fmt_spread(res.get("ratios_output_tps", {}).get(f"lamina / {name}"))
        b = max(r.get("cpu_busy_before") or 0, r.get("others_cpu_during") or 0)
        if b > common.BUSY_THRESHOLD:
            label += f" ⚠{b:.0%}"
        lines.append(f"| {label} | {med(r['output_tps'])} | {med(r['total_tps'])} | {elapsed} | "
                     f"{ratio if name != 'lamina' else ''} |")
    hf = res["systems"].get("hf", {})
    if hf.get("pad_ratio"):
        lines += ["", f"transformers' batches of {cfg['hf_batch_size']} "
                      f"({'sorted by length' if hf.get('sorted_by_length') else 'in their order'}) processed "
                      f"{hf['pad_ratio']['median']:.2f}x the real prompt tokens with left padding "
                      f"(unsorted: {hf['pad_ratio_unsorted']['median']:.2f}x)."]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=common.DEFAULT_MODEL)
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
    ap.add_argument("--hf-unsorted", action="store_true",
                    help="transformers' batches in the prompts' order (default: sorted by length first)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; --quick 1)")
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
    rounds = args.rounds or (1 if args.quick else 3)
    res = run_offline(args.model, [s for s in args.systems.split(",") if s], cfg, args.lamina_dtype, args.hf_dtype,
                      args.threads, rounds=rounds, hf_sort=not args.hf_unsorted)
    os.makedirs(OUT_DIR, exist_ok=True)
    path = args.json or os.path.join(OUT_DIR, f"offline-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(markdown(res))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
