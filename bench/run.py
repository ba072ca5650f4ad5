"""lamina's benchmark suite: lamina and its installed peers on one model and one workload, in one run.

    lamina bench                                 # everything (same as: python bench/run.py)
    lamina bench --quick                         # a smoke run of every section (< 3 minutes)
    lamina bench --only decode,prefill           # some sections
    lamina bench --systems lamina,lamina-int8,llamacpp

Sections
  machine   memory read bandwidth and bf16/fp32 matmul peak of this machine (always, unless --no-machine):
            the roofline of the decode table
  decode    single stream: TTFT of a 48-token prompt, decode tok/s over 256 generated tokens, the bytes
            of weights each token reads, achieved GB/s and % of the measured bandwidth, the roofline tok/s
  prefill   a 512-token prompt: prompt tokens / time to the first token
  offline   256 prompts (the performance issue's workload; --offline-prompts) of 16-512 tokens, 64 new
            tokens each, all at once, vs one at a time, transformers batched, llama-server (bench/offline.py)
  serve     `lamina serve` vs `llama-server --parallel 32`, both driven by bench/serve.py over a
            concurrency sweep (1, 4, 16, 32, 64): TTFT / ITL p50-p99, output tok/s
  first-answer  seconds from launching `lamina serve` (empty and filled Inductor cache), `LLM(...)` in
            a fresh python, and `llama-server` to their first answer, and to lamina's full compiled
            speed (bench/first_answer.py)

Systems (--systems; those not installed are skipped and say so)
  lamina         lamina's library API as configured by default (--lamina-dtype auto, compiled decode)
  lamina-bf16, lamina-fp32, lamina-int8 / lamina-int4 (bf16 + int8 / int4 weights),
  lamina-eager (no torch.compile)
  hf-bf16, hf-fp32   transformers AutoModelForCausalLM, SDPA attention, greedy generate
  llamacpp       llama.cpp on the model's source GGUF (Q4_1): llama-bench when built
                 (bash bench/build_llamacpp.sh), else the llama_cpp Python bindings
  llamacpp-py    the llama_cpp Python bindings, always

Every system runs in its own subprocess, on the same prompt token ids. Each system is loaded once
per section; then --rounds rounds (default 3) measure every system back to back, the order
rotating each round, so the host's drift in speed (these VMs drift up to 2x within minutes) hits
all systems alike. Numbers are medians over rounds with their min–max; a ratio is the median of the
per-round ratios with their min–max. Results: bench/out/bench-<time>.json and .md (and
latest.json / latest.md).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from common import (BENCH_DIR, OUT_DIR, REPO_DIR, OthersMeter, Worker, fmt, fmt_spread, free_port,  # noqa: E402
                    gguf_path, have_module, interleave, launch, llama_bin, llamacpp_build_info, log, median_tree,
                    model_dir, round_ratios, run_worker, spread, stop, wait_compiled, wait_for_idle, wait_health,
                    weight_bytes_gguf)

SECTIONS = ("decode", "prefill", "offline", "serve", "first-answer")
DEFAULT_SYSTEMS = "lamina,hf-bf16,hf-fp32,llamacpp"
QUICK_SYSTEMS = "lamina,hf-bf16,llamacpp"
ALL_SYSTEMS = ("lamina", "lamina-bf16", "lamina-fp32", "lamina-int8", "lamina-int4", "lamina-eager", "hf-bf16", "hf-fp32",
               "llamacpp", "llamacpp-py")


# --------------------------------------------------------------------------------------------
# what the run ran on


def machine_description() -> dict:
    d: dict = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            k, _, v = line.partition(":")
            if k.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "Socket(s)",
                             "L3 cache", "Hypervisor vendor", "CPU max MHz"):
                d[k.strip()] = v.strip()
        flags = next((line for line in out.splitlines() if line.startswith("Flags:")), "")
        d["simd"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
                     if f" {f}" in flags]
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    d["mem_total_gib"] = round(int(line.split()[1]) / (1 << 20), 1)
    except OSError:
        pass
    return d


def versions() -> dict:
    v: dict = {}
    code = ("import json, importlib.metadata as m\n"
            "out = {}\n"
            "for p in ('torch', 'transformers', 'llama-cpp-python', 'numpy', 'tokenizers'):\n"
            "    try: out[p] = m.version(p)\n"
            "    except Exception: pass\n"
            "print(json.dumps(out))")
    try:
        v.update(json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout))
    except ValueError:
        pass
    sys.path.insert(0, REPO_DIR)
    import lamina
    v["lamina"] = lamina.__version__
    try:
        commit = subprocess.run(["git", "-C", REPO_DIR, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO_DIR, "status", "--porcelain", "--", "lamina"],
                               capture_output=True, text=True).stdout.strip()
        v["lamina_commit"] = commit + ("+uncommitted changes in lamina/" if dirty else "")
    except OSError:
        pass
    info = llamacpp_build_info()
    if info:
        v["llama.cpp (built)"] = f"{info.get('llama.cpp_commit', '?')[:12]} from llama-cpp-python " \
                                 f"{info.get('llama-cpp-python', '?')} sdist ({info.get('build_flags', '')})"
    return v


def load() -> float:
    return round(os.getloadavg()[0], 2)


# --------------------------------------------------------------------------------------------
# systems


def system_args(name: str, args) -> list[str] | None:
    """workers.py arguments of a torch/python system, None for llama-bench."""
    lam = ["--engine", "lamina", "--kv-cache-memory", str(1 << 30)]
    table = {
        "lamina": lam + ["--dtype", args.lamina_dtype],
        "lamina-bf16": lam + ["--dtype", "bfloat16"],
        "lamina-fp32": lam + ["--dtype", "float32"],
        "lamina-int8": lam + ["--dtype", "bfloat16", "--quantization", "int8"],
        "lamina-int4": lam + ["--dtype", "bfloat16", "--quantization", "int4"],
        "lamina-eager": lam + ["--dtype", args.lamina_dtype, "--eager"],
        "hf-bf16": ["--engine", "hf", "--dtype", "bfloat16"],
        "hf-fp32": ["--engine", "hf", "--dtype", "float32"],
        "llamacpp-py": ["--engine", "llamacpp-py"],
    }
    return table.get(name)


def available(name: str, hf_dir: str) -> tuple[bool, str]:
    if name.startswith("hf-") and not have_module("transformers"):
        return False, "transformers not installed (pip install -r bench/requirements.txt)"
    if name.startswith("llamacpp"):
        if not gguf_path(hf_dir):
            return False, f"no source.gguf in {hf_dir}"
        if name == "llamacpp" and llama_bin("llama-bench"):
            return True, ""
        if not have_module("llama_cpp"):
            return False, "neither llama-bench (bash bench/build_llamacpp.sh) nor llama_cpp (pip) installed"
    return True, ""


def worker_command(task: str, name: str, args, extra: list[str]) -> str:
    return f"python bench/workers.py {task} {' '.join(system_args(name, args) or [])} {' '.join(extra)}".strip()


# --------------------------------------------------------------------------------------------
# sections


def section_latency(systems: list[str], sections: list[str], args, hf_dir: str, results: dict) -> None:
    """decode and prefill: each system loaded once (llama-bench: one call per round and section),
    then every round measures every system, order rotating."""
    q = args.quick
    dec = {"prompt_len": 48, "gen": 32 if q else 256}
    pre = {"prompt_len": 128 if q else 512, "runs": 1 if q else 3}  # prefill: the median of 3 in each round
    rounds = args.rounds
    workers: dict[str, Worker] = {}
    names = []
    for name in systems:
        ok, why = available(name, hf_dir)
        if not ok:
            log(f"skipping {name}: {why}")
            for s in sections:
                results[s][name] = {"skipped": why}
            continue
        if name != "llamacpp" or not llama_bin("llama-bench"):
            wname = "llamacpp-py" if name == "llamacpp" else name
            log(f"loading {name}")
            w = Worker(system_args(wname, args) + ["--model-dir", hf_dir, "--threads", str(args.threads), "--name", name])
            if not w.ok:
                w.close()
                for s in sections:
                    results[s][name] = {"error": w.ready["error"]}
                continue
            workers[name] = w
        names.append(name)
    gguf = gguf_path(hf_dir)

    def llama_bench(section: str) -> dict:
        from llamacpp import run_llama_bench
        if section == "decode":
            r = run_llama_bench(gguf, args.threads, [dec["prompt_len"]], dec["gen"], 1)
            pp = r.get("tests", {}).get(f"pp{dec['prompt_len']}", {}).get("median_ts")
            return {"error": r["error"]} if "error" in r else {
                "decode_tps": r["tests"].get(f"tg{dec['gen']}", {}).get("median_ts"),
                "ttft_s": dec["prompt_len"] / pp if pp else None, "samples": r["tests"], "command": r["command"],
                "info": {k: r.get(k) for k in ("build_commit", "build_number", "model_type", "model_size", "n_threads")}}
        r = run_llama_bench(gguf, args.threads, [pre["prompt_len"]], 0, pre["runs"])
        pp = r.get("tests", {}).get(f"pp{pre['prompt_len']}", {}).get("median_ts")
        return {"error": r["error"]} if "error" in r else {
            "prefill_tps": pp, "ttft_s": pre["prompt_len"] / pp if pp else None, "samples": r["tests"],
            "command": r["command"]}

    def measure(name: str, r: int) -> dict:
        out = {}
        for s in sections:
            quiet = wait_for_idle(f"{s} {name} round {r + 1}/{rounds}")
            if name in workers:
                if s == "decode":
                    res = workers[name].call("decode", prompt_len=dec["prompt_len"], gen=dec["gen"], seeds=[1 + r],
                                             warmup_seed=1000 + r, warmup_tokens=8)
                else:
                    res = workers[name].call("prefill", prompt_len=pre["prompt_len"], warmup_seed=1000 + r,
                                             seeds=[1 + r * pre["runs"] + i for i in range(pre["runs"])])
            else:
                with OthersMeter() as meter:
                    res = llama_bench(s)
                res["others_cpu_during"] = meter.fraction
            res.update(quiet)
            if "error" in res:
                log(f"{s} {name} round {r + 1}: {res['error']}")
            out[s] = res
        return out

    try:
        per_round = interleave(names, rounds, measure)
    finally:
        for w in workers.values():
            w.close()

    keys = {"decode": ("decode_tps", "ttft_s"), "prefill": ("prefill_tps", "ttft_s")}
    for s in sections:
        for name in names:
            runs = [x[s] for x in per_round[name]]
            ok = [x for x in runs if "error" not in x]
            if not ok:
                results[s][name] = {"error": runs[0]["error"] if runs else "no rounds", "rounds": runs}
                continue
            r = {k: median_tree([x.get(k) for x in ok]) for k in keys[s]}
            r["spread"] = {k: spread([x.get(k) for x in ok]) for k in keys[s]}
            r["cpu_busy_before"] = max(x.get("cpu_busy_before") or 0 for x in ok)
            r["others_cpu_during"] = max(x.get("others_cpu_during") or 0 for x in ok)
            r["rounds"] = runs
            if name in workers:
                ready = workers[name].ready
                r.update(engine=ready.get("engine"), weight_bytes=ready.get("weight_bytes"), info=ready.get("info"))
                wname = "llamacpp-py" if name == "llamacpp" else name
                p = dec if s == "decode" else pre
                extra = ["--prompt-len", str(p["prompt_len"]),
                         *(["--gen", str(p["gen"])] if s == "decode" else []), "--runs", str(rounds)]
                r["command"] = worker_command(s, wname, args, ["--model-dir", hf_dir, "--threads", str(args.threads),
                                                               *extra]) + "  (one process; the suite interleaves rounds)"
                r["first_tokens"] = next((x["runs"][0].get("first_tokens") for x in ok if x.get("runs")), None)
            else:
                r.update(engine="llama-bench", weight_bytes=weight_bytes_gguf(gguf), command=ok[0]["command"],
                         info=ok[0].get("info"))
                if s == "decode":
                    r["note"] = (f"TTFT = {dec['prompt_len']} / pp{dec['prompt_len']} tok/s (prompt processing time, "
                                 f"no sampling); decode = tg{dec['gen']} (from an empty context)")
            results[s][name] = r

    # ratios: every lamina system against every peer, per round, on the section's headline number
    for s in sections:
        key = keys[s][0]
        ratios = {}
        for a in [n for n in names if n.startswith("lamina")]:
            for b in [n for n in names if not n.startswith("lamina")]:
                rr = round_ratios([x[s].get(key) for x in per_round[a]], [x[s].get(key) for x in per_round[b]])
                if rr:
                    ratios[f"{a} / {b}"] = rr
        results.setdefault("ratios", {})[s] = ratios


def derive_latency(results: dict, machine: dict, hf_dir: str) -> None:
    bw = machine.get("read_gbps")
    flops_per_token = 2 * linear_params(hf_dir)
    for name, r in results.get("decode", {}).items():
        wb, tps = r.get("weight_bytes"), r.get("decode_tps")
        if wb and bw:
            r["roofline_tps"] = bw * 1e9 / wb
        if wb and tps:
            r["achieved_gbps"] = tps * wb / 1e9
            if bw:
                r["pct_of_bandwidth"] = 100 * r["achieved_gbps"] / bw
    for name, r in results.get("prefill", {}).items():
        tps = r.get("prefill_tps")
        dtype = (r.get("info") or {}).get("dtype")
        peak = {"bfloat16": machine.get("matmul_bf16_gflops"), "float32": machine.get("matmul_fp32_gflops")}.get(dtype)
        if tps:
            r["gflops"] = tps * flops_per_token / 1e9
            if peak:
                r["pct_of_matmul_peak"] = 100 * r["gflops"] / peak


def linear_params(hf_dir: str) -> int:
    """Parameters of the matmuls a prompt token goes through (every layer's projections; not lm_head,
    which runs for the last token only)."""
    with open(os.path.join(hf_dir, "config.json")) as f:
        c = json.load(f)
    h, i = c["hidden_size"], c["intermediate_size"]
    hd = c.get("head_dim") or h // c["num_attention_heads"]
    q = c["num_attention_heads"] * hd
    kv = (c.get("num_key_value_heads") or c["num_attention_heads"]) * hd
    return c["num_hidden_layers"] * (h * q + 2 * h * kv + q * h + 3 * h * i)


def section_offline(systems: list[str], args, results: dict) -> None:
    from offline import default_config, run_offline
    cfg = default_config(args.quick)
    if not args.quick:
        cfg["num_prompts"] = args.offline_prompts
    off_systems = ["lamina", "lamina-serial"]
    hf = [s for s in systems if s.startswith("hf-")]
    if hf:
        off_systems.append("hf")
    if any(s.startswith("llamacpp") for s in systems):
        off_systems.append("llamacpp-server")
    hf_dtype = "bfloat16" if "hf-bf16" in hf or not hf else "float32"
    results["offline"] = run_offline(args.model, off_systems, cfg, lamina_dtype=args.lamina_dtype, hf_dtype=hf_dtype,
                                     threads=args.threads, rounds=args.rounds)


def section_serve(systems: list[str], args, hf_dir: str, results: dict) -> None:
    """`lamina serve` and `llama-server` started once each, then every round sweeps both with
    bench/serve.py, order rotating; round r's requests use prompt seed r on both servers."""
    from llamacpp import LlamaServer
    q = args.quick
    levels = "1,4" if q else args.serve_levels
    max_tokens = 16 if q else args.serve_max_tokens
    load_args = ["--endpoint", "completions", "--levels", levels, "--max-tokens", str(max_tokens),
                 "--prompt-words", str(args.serve_prompt_words)]
    if q:
        load_args += ["--num-requests", "4"]
    else:
        load_args += ["--requests-per-client", str(args.serve_requests_per_client), "--min-requests", "8"]
    rounds = args.rounds
    serve: dict = {"levels": levels, "max_tokens": max_tokens, "prompt_words": args.serve_prompt_words,
                   "rounds": rounds, "systems": {}}
    results["serve"] = serve
    os.makedirs(OUT_DIR, exist_ok=True)

    def drive(name: str, base_url: str, r: int) -> dict:
        out = os.path.join(OUT_DIR, f"serve-{name}-{r}.json")
        if os.path.exists(out):
            os.unlink(out)  # never report an earlier run's file
        cmd = [sys.executable, os.path.join(BENCH_DIR, "serve.py"), "--base-url", base_url, *load_args,
               "--seed", str(r), "--out", out]
        log("running " + " ".join(cmd))
        proc = subprocess.run(cmd, cwd=REPO_DIR)
        if not os.path.exists(out):
            return {"error": f"bench/serve.py exited {proc.returncode} without results"}
        with open(out) as f:
            res = json.load(f)
        res["load_command"] = "python bench/serve.py " + " ".join(cmd[2:])
        if proc.returncode != 0:
            res["warning"] = f"bench/serve.py exited {proc.returncode} (some requests failed)"
        return res

    servers: dict = {}  # name -> (base url, pid, server command)
    lamina_proc = llama = None
    try:
        port = free_port()
        cmd = [sys.executable, "-m", "lamina", "serve", "--model", args.model, "--port", str(port), "--dtype",
               args.lamina_dtype, "--num-threads", str(args.threads), "--kv-cache-memory",
               str(args.serve_kv_cache_memory), "--no-access-log"]
        log("starting " + " ".join(cmd))
        log_path = os.path.join(OUT_DIR, "lamina-serve.log")
        lamina_proc = launch(cmd, log_path)
        if wait_health(port, lamina_proc, timeout=900):
            # never measure beside lamina's background compile, nor measure its eager steps
            state = wait_compiled(log_path, lamina_proc, timeout=3600)
            log(f"lamina serve is up (background compile: {state})")
            servers["lamina"] = (f"http://127.0.0.1:{port}/v1", lamina_proc.pid, "lamina serve " + " ".join(cmd[4:]))
            serve["lamina_compile"] = state
        else:
            serve["systems"]["lamina"] = {"error": f"lamina serve did not become ready; see {log_path}"}
        if any(s.startswith("llamacpp") for s in systems):
            gguf = gguf_path(hf_dir)
            if not llama_bin("llama-server") or not gguf:
                serve["systems"]["llamacpp-server"] = {"skipped": "llama-server not built (bash bench/build_llamacpp.sh)"}
            else:
                llama = LlamaServer(gguf, parallel=args.serve_parallel, threads=args.threads,
                                    ctx=args.serve_parallel * args.serve_ctx_per_slot, log_name="llama-server-serve.log")
                try:
                    llama.__enter__()
                    servers["llamacpp-server"] = (f"http://127.0.0.1:{llama.port}/v1", llama.proc.pid, llama.command)
                except RuntimeError as e:
                    serve["systems"]["llamacpp-server"] = {"error": str(e)}
                    llama = None

        def measure(name: str, r: int) -> dict:
            url, pid, _ = servers[name]
            quiet = wait_for_idle(f"serve {name} round {r + 1}/{rounds}")
            with OthersMeter(pids=[pid]) as meter:
                res = drive(name, url, r)
            res.update(quiet, others_cpu_during=meter.fraction, round=r)
            return res

        per_round = interleave(list(servers), rounds, measure)
    finally:
        if lamina_proc:
            stop(lamina_proc, timeout=60)
        if llama:
            llama.__exit__(None, None, None)

    for name, runs in per_round.items():
        ok = [x for x in runs if "levels" in x]
        if not ok:
            serve["systems"][name] = {"error": runs[0].get("error", "no results") if runs else "no rounds", "rounds": runs}
            continue
        serve["systems"][name] = {
            "levels": median_tree([x["levels"] for x in ok]),  # element-wise medians over rounds
            "server_command": servers[name][2], "load_command": ok[0].get("load_command"),
            "cpu_busy_before": max(x.get("cpu_busy_before") or 0 for x in ok),
            "others_cpu_during": max(x.get("others_cpu_during") or 0 for x in ok), "rounds": runs}
    a, b = per_round.get("lamina"), per_round.get("llamacpp-server")
    serve["ratios"] = {}
    if a and b:
        def at(runs, c, key):
            out = []
            for x in runs:
                lv = next((lv for lv in x.get("levels", []) if lv["concurrency"] == c), None)
                out.append(None if lv is None else (lv[key] if key == "output_tokens_per_s" else lv[key]["p50"]))
            return out
        for c in [int(x) for x in levels.split(",")]:
            serve["ratios"][str(c)] = {
                "output_tokens_per_s": round_ratios(at(a, c, "output_tokens_per_s"), at(b, c, "output_tokens_per_s")),
                "ttft_p50": round_ratios(at(a, c, "ttft_s"), at(b, c, "ttft_s")),
                "itl_p50": round_ratios(at(a, c, "itl_s"), at(b, c, "itl_s"))}


def section_first_answer(systems: list[str], args, results: dict) -> None:
    """lamina serve (cold and warm Inductor cache), LLM(...) in a fresh python, and llama-server
    when a llamacpp system is selected; --quick stops at the first answers."""
    from first_answer import SYSTEMS, run_first_answer
    names = [s for s in SYSTEMS if s != "llama-server" or any(x.startswith("llamacpp") for x in systems)]
    results["first-answer"] = run_first_answer(args.model, names, rounds=args.rounds, full_speed=not args.quick)


# --------------------------------------------------------------------------------------------
# report


def busy(r: dict) -> str:
    """A mark for numbers measured while other processes kept the CPUs busy."""
    b = max(r.get("cpu_busy_before") or 0, r.get("others_cpu_during") or 0)
    return f" ⚠{b:.0%}" if b > common.BUSY_THRESHOLD else ""


def system_rows(results: dict, cells) -> list[str]:
    """One table row per system: `cells(result)` gives its columns after the name; a skipped or
    failed system gets its reason in the first column and blanks after."""
    rows = []
    for name, r in results.items():
        if "skipped" in r or "error" in r:
            rows.append(f"| {name} | {r.get('skipped') or r.get('error')} |" + " |" * (len(cells({})) - 1))
        else:
            rows.append(f"| {name}{busy(r)} | " + " | ".join(cells(r)) + " |")
    return rows


def markdown(res: dict) -> str:
    m, meta = res.get("machine", {}), res["meta"]
    lines = [f"# lamina bench — {meta['started']}", "",
             f"Command: `{meta['command']}`  ", f"Model: {meta['model']} ({meta['model_dir']})  ",
             f"Machine: {meta['machine'].get('Model name', '?')}, {meta['machine'].get('CPU(s)', '?')} CPUs, "
             f"{meta['machine'].get('mem_total_gib', '?')} GiB RAM; threads per system: {meta['threads']}  ",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()), ""]
    if meta.get("load_warning"):
        lines += [f"**Warning:** {meta['load_warning']}", ""]
    for section, err in (res.get("section_errors") or {}).items():
        lines += [f"**Section {section} failed:** `{err}`", ""]
    lines += [f"⚠N% after a system's name: other processes kept N% of the CPUs busy just before or during its "
              f"measurement (the larger; flagged above {common.BUSY_THRESHOLD:.0%}): such numbers are low and not "
              "comparable.", ""]
    if m:
        lines += ["## Machine", "",
                  "| memory read GB/s | copy GB/s | 1-thread read GB/s | fp32 matmul GFLOP/s | bf16 matmul GFLOP/s "
                  "| int8 matmul GOP/s | AMX |",
                  "|---:|---:|---:|---:|---:|---:|---|",
                  f"| {fmt(m.get('read_gbps'))} | {fmt(m.get('copy_gbps'))} | {fmt(m.get('read_gbps_1thread_numpy'))} | "
                  f"{fmt(m.get('matmul_fp32_gflops'))} | {fmt(m.get('matmul_bf16_gflops'))} | "
                  f"{fmt(m.get('matmul_int8_gops'))} | {m.get('amx', '?')} |", "",
                  f"({m.get('read_method')}; {m.get('matmul_method')})", ""]
    def with_range(r: dict, key: str, scale: float = 1.0, digits: int = 1) -> str:
        """'91.2 (88.0–93.5)': the median over rounds and its range."""
        sp = (r.get("spread") or {}).get(key)
        if not sp or sp["n"] < 2:
            return fmt(r[key] * scale if r.get(key) else None, digits)
        return f"{fmt(sp['median'] * scale, digits)} ({fmt(sp['min'] * scale, digits)}–{fmt(sp['max'] * scale, digits)})"

    def ratio_table(section: str, what: str) -> list[str]:
        """lamina systems (rows) against each peer (columns): median of the per-round ratios (min–max)."""
        ratios = (res.get("ratios") or {}).get(section) or {}
        if not ratios:
            return []
        rows = sorted({k.split(" / ")[0] for k in ratios}, key=list(res.get("systems", [])).index)
        cols = sorted({k.split(" / ")[1] for k in ratios}, key=list(res.get("systems", [])).index)
        out = ["", f"{what}, lamina / peer: the median of the {rounds} per-round ratios (min–max)", "",
               "| | " + " | ".join(f"/ {c}" for c in cols) + " |", "|---|" + "---:|" * len(cols)]
        for a in rows:
            out.append(f"| {a} | " + " | ".join(fmt_spread(ratios.get(f"{a} / {b}")) for b in cols) + " |")
        return out

    rounds = res["config"].get("rounds", 1)
    if res.get("decode"):
        d = res["decode"]
        cfg = res["config"]["decode"]
        lines += [f"## Decode (single stream: {cfg['prompt_len']}-token prompt, {cfg['gen']} new tokens; median of "
                  f"{rounds} interleaved rounds, min–max)", "",
                  "| system | TTFT (ms) | decode tok/s | weights read / token (MB) | achieved GB/s | % of bandwidth "
                  "| roofline tok/s |", "|---|---:|---:|---:|---:|---:|---:|"]
        lines += system_rows(d, lambda r: [with_range(r, "ttft_s", 1000), with_range(r, "decode_tps"),
                                           fmt((r.get("weight_bytes") or 0) / 1e6),
                                           fmt(r.get("achieved_gbps"), 2), fmt(r.get("pct_of_bandwidth")),
                                           fmt(r.get("roofline_tps"))])
        ref = next((n for n in ("hf-fp32", "hf-bf16") if d.get(n, {}).get("first_tokens")), None)
        agree = []
        for name, r in d.items():
            toks = r.get("first_tokens")
            if ref and toks and name != ref:
                same = sum(a == b for a, b in zip(toks, d[ref]["first_tokens"]))
                agree.append(f"{name} {same}/{len(toks)}")
        if agree:
            lines += ["", f"Greedy tokens of round 1 equal to {ref}'s (first 16): " + ", ".join(agree) + "."]
        lines += ratio_table("decode", "Decode tok/s")
        lines.append("")
    if res.get("prefill"):
        p = res["prefill"]
        cfg = res["config"]["prefill"]
        lines += [f"## Prefill ({cfg['prompt_len']}-token prompt, 1 new token; per round the median of "
                  f"{cfg['runs_per_round']}; median of {rounds} interleaved rounds, min–max)", "",
                  "| system | TTFT (ms) | prefill tok/s | GFLOP/s | % of matmul peak |", "|---|---:|---:|---:|---:|"]
        lines += system_rows(p, lambda r: [with_range(r, "ttft_s", 1000), with_range(r, "prefill_tps"),
                                           fmt(r.get("gflops")), fmt(r.get("pct_of_matmul_peak"))])
        lines += ratio_table("prefill", "Prefill tok/s")
        lines.append("")
    if res.get("offline"):
        from offline import markdown as offline_md
        lines += ["## Offline throughput", "", offline_md(res["offline"]), ""]
    if res.get("serve"):
        s = res["serve"]
        lines += [f"## Serving sweep (bench/serve.py, /v1/completions streaming, ~{s['prompt_words']}-word prompts, "
                  f"{s['max_tokens']} tokens each, EOS ignored; element-wise medians of {s.get('rounds', 1)} "
                  "interleaved rounds)", "",
                  "| system | concurrency | ok/requests | output tok/s | TTFT p50 / p95 / p99 (ms) | "
                  "ITL p50 / p95 / p99 (ms) | GET /health p50 / max (ms) | prompt tokens |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, r in s["systems"].items():
            if "levels" not in r:
                lines.append(f"| {name} | {r.get('skipped') or r.get('error')} | | | | | | |")
                continue
            for lv in r["levels"]:
                t, i = lv["ttft_s"], lv["itl_s"]
                h = lv.get("health_s") or {}

                def ms(x):
                    return fmt(x * 1000 if x is not None else None)
                lines.append(f"| {name}{busy(r)} | {lv['concurrency']} | {fmt(lv['completed'])}/{fmt(lv['requests'])} | "
                             f"{fmt(lv['output_tokens_per_s'])} | {ms(t['p50'])} / {ms(t['p95'])} / {ms(t['p99'])} | "
                             f"{ms(i['p50'])} / {ms(i['p95'])} / {ms(i['p99'])} | {ms(h.get('p50'))} / {ms(h.get('max'))} | "
                             f"{fmt(lv.get('mean_prompt_tokens'))} |")
        if s.get("ratios"):
            lines += ["", "lamina / llama-server, the median of the per-round ratios (min–max):", "",
                      "| concurrency | output tok/s | TTFT p50 | ITL p50 |", "|---:|---:|---:|---:|"]
            for c, rr in s["ratios"].items():
                lines.append(f"| {c} | {fmt_spread(rr['output_tokens_per_s'])} | {fmt_spread(rr['ttft_p50'])} | "
                             f"{fmt_spread(rr['itl_p50'])} |")
        lines.append("")
    if res.get("first-answer"):
        from first_answer import markdown as first_answer_md
        lines += ["## Time to first answer (bench/first_answer.py)", "", first_answer_md(res["first-answer"]), ""]
    lines += ["## Commands behind the numbers", ""]
    for section in ("decode", "prefill"):
        for name, r in res.get(section, {}).items():
            if r.get("command"):
                lines.append(f"- {section} / {name}: `{r['command']}`")
    for name, r in res.get("offline", {}).get("systems", {}).items():
        if r.get("command"):
            lines.append(f"- offline / {name}: `{r['command']}`")
    for name, r in res.get("serve", {}).get("systems", {}).items():
        if r.get("server_command"):
            lines.append(f"- serve / {name}: `{r['server_command']}` driven by `{r.get('load_command', '')}` "
                         f"(--seed = the round)")
    for name, cmd in res.get("first-answer", {}).get("commands", {}).items():
        lines.append(f"- first-answer / {name}: `{cmd}`")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lamina bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(SECTIONS),
                    help=f"comma-separated, from {', '.join(SECTIONS)} (default: all)")
    ap.add_argument("--quick", action="store_true", help="a fast smoke run of every selected section")
    ap.add_argument("--systems", default=None,
                    help=f"comma-separated, from {', '.join(ALL_SYSTEMS)} (default: {DEFAULT_SYSTEMS}; "
                         f"--quick: {QUICK_SYSTEMS})")
    ap.add_argument("--model", default=common.DEFAULT_MODEL)
    ap.add_argument("--lamina-dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of every system (default: all)")
    ap.add_argument("--rounds", "--runs", type=int, default=None, dest="rounds",
                    help="interleaved rounds of every section (default 3, --quick 1): every system is measured "
                         "once per round, the order rotating; numbers are medians over rounds, ratios medians of "
                         "per-round ratios, each with its min–max")
    ap.add_argument("--no-machine", action="store_true", help="skip the bandwidth / matmul measurement")
    ap.add_argument("--wait-idle", type=float, default=120.0,
                    help="before each measurement, wait up to this many seconds for other processes to leave "
                         "the CPUs idle (default: %(default)s; 0: never wait). Busy measurements are flagged")
    ap.add_argument("--offline-prompts", type=int, default=256,
                    help="prompts in the offline set (default %(default)s, as bench/offline.py; 128 halves the "
                         "section's time on 2 cores)")
    ap.add_argument("--serve-levels", default="1,4,16,32,64")
    ap.add_argument("--serve-max-tokens", type=int, default=64)
    ap.add_argument("--serve-prompt-words", type=int, default=100)
    ap.add_argument("--serve-requests-per-client", type=int, default=1)
    ap.add_argument("--serve-parallel", type=int, default=32, help="llama-server --parallel")
    ap.add_argument("--serve-ctx-per-slot", type=int, default=512, help="llama-server -c = parallel x this")
    ap.add_argument("--serve-kv-cache-memory", type=int, default=2 << 30, help="lamina serve --kv-cache-memory")
    ap.add_argument("--out", default=None, help="output stem (default: bench/out/bench-<time>)")
    raw = sys.argv[1:] if argv is None else list(argv)
    if raw[:1] == ["--"]:  # `lamina bench -- --quick`: the separator reaches us
        raw = raw[1:]
    args = ap.parse_args(raw)

    common.WAIT_IDLE_S = args.wait_idle
    sections = [s for s in args.only.split(",") if s]
    for s in sections:
        if s not in SECTIONS:
            ap.error(f"unknown section {s!r}; choose from {', '.join(SECTIONS)}")
    systems = [s for s in (args.systems or (QUICK_SYSTEMS if args.quick else DEFAULT_SYSTEMS)).split(",") if s]
    for s in systems:
        if s not in ALL_SYSTEMS:
            ap.error(f"unknown system {s!r}; choose from {', '.join(ALL_SYSTEMS)}")

    if args.rounds is None:
        args.rounds = 1 if args.quick else 3

    t_start = time.time()
    hf_dir = model_dir(args.model)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    res: dict = {"meta": {"started": started, "command": "python bench/run.py " + " ".join(raw),
                          "model": args.model, "model_dir": hf_dir, "threads": args.threads,
                          "machine": machine_description(), "versions": versions(), "load_at_start": load()},
                 "systems": systems, "sections": sections,
                 "config": {"decode": {"prompt_len": 48, "gen": 32 if args.quick else 256},
                            "prefill": {"prompt_len": 128 if args.quick else 512,
                                        "runs_per_round": 1 if args.quick else 3},
                            "rounds": args.rounds, "quick": args.quick}}
    log(f"sections {','.join(sections)}; systems {','.join(systems)}; model dir {hf_dir}")

    if not args.no_machine:
        log("measuring memory bandwidth and matmul peak")
        quiet = wait_for_idle("machine")
        res["machine"] = run_worker(["machine", "--threads", str(args.threads)] + (["--quick"] if args.quick else []))
        res["machine"].update(quiet)
        log(f"read {res['machine'].get('read_gbps', 0):.1f} GB/s, fp32 {res['machine'].get('matmul_fp32_gflops', 0):.0f}"
            f" GFLOP/s, bf16 {res['machine'].get('matmul_bf16_gflops', 0):.0f} GFLOP/s, int8 "
            f"{res['machine'].get('matmul_int8_gops', 0):.0f} GOP/s; AMX {res['machine'].get('amx', '?')}")

    os.makedirs(OUT_DIR, exist_ok=True)
    stem = args.out or os.path.join(OUT_DIR, "bench-" + time.strftime("%Y%m%d-%H%M%S"))

    def save() -> str:
        res["meta"]["elapsed_s"] = round(time.time() - t_start, 1)
        md = markdown(res)
        for path, text in ((stem + ".json", json.dumps(res, indent=1)), (stem + ".md", md),
                           (os.path.join(OUT_DIR, "latest.json"), json.dumps(res, indent=1)),
                           (os.path.join(OUT_DIR, "latest.md"), md)):
            with open(path, "w") as f:
                f.write(text)
        return md

    def guarded(section: str, fn, *fn_args) -> None:
        """A section that crashes is reported in the results; the others still run."""
        try:
            fn(*fn_args)
        except Exception as e:  # noqa: BLE001
            import traceback
            traceback.print_exc()
            res.setdefault("section_errors", {})[section] = repr(e)
        save()  # partial results survive a later crash or ^C

    lat = [s for s in sections if s in ("decode", "prefill")]
    for s in lat:
        res[s] = {}
    if lat:
        guarded("latency", section_latency, systems, lat, args, hf_dir, res)
        derive_latency(res, res.get("machine", {}), hf_dir)
    if "offline" in sections:
        guarded("offline", section_offline, systems, args, res)
    if "serve" in sections:
        guarded("serve", section_serve, systems, args, hf_dir, res)
    if "first-answer" in sections:
        guarded("first-answer", section_first_answer, systems, args, res)
    res["meta"]["load_at_end"] = load()
    md = save()
    print(md)
    log(f"wrote {stem}.json and {stem}.md ({res['meta']['elapsed_s']:.0f}s)")
    if "serve" in sections and have_module("matplotlib"):
        subprocess.run([sys.executable, os.path.join(BENCH_DIR, "plot.py"), stem + ".json"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
