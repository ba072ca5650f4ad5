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

Systems (--systems; those not installed are skipped and say so)
  lamina         lamina's library API as configured by default (--lamina-dtype auto, compiled decode)
  lamina-bf16, lamina-fp32, lamina-int8 / lamina-int4 (bf16 + int8 / int4 weights),
  lamina-eager (no torch.compile)
  hf-bf16, hf-fp32   transformers AutoModelForCausalLM, SDPA attention, greedy generate
  llamacpp       llama.cpp on the model's source GGUF (Q4_1): llama-bench when built
                 (bash bench/build_llamacpp.sh), else the llama_cpp Python bindings
  llamacpp-py    the llama_cpp Python bindings, always

Every system runs in its own subprocess, on the same prompt token ids; numbers are the median of
--runs runs (default 3). Results: bench/out/bench-<time>.json and .md (and latest.json / latest.md).
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
from common import (BENCH_DIR, OUT_DIR, REPO_DIR, OthersMeter, fmt, gguf_path, have_module, llama_bin,  # noqa: E402
                    llamacpp_build_info, log, model_dir, run_worker, wait_for_idle, weight_bytes_gguf)

SECTIONS = ("decode", "prefill", "offline", "serve")
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
    """decode and prefill: one fresh process per system and section (llama-bench: one call for both)."""
    q = args.quick
    dec = {"prompt_len": 48, "gen": 32 if q else 256}
    pre = {"prompt_len": 128 if q else 512}
    runs = 1 if q else args.runs
    for name in systems:
        ok, why = available(name, hf_dir)
        if not ok:
            log(f"skipping {name}: {why}")
            for s in sections:
                results[s][name] = {"skipped": why}
            continue
        if name == "llamacpp" and llama_bin("llama-bench"):
            from llamacpp import run_llama_bench
            pls = ([dec["prompt_len"]] if "decode" in sections else []) + \
                  ([pre["prompt_len"]] if "prefill" in sections else [])
            gen = dec["gen"] if "decode" in sections else 0
            quiet = wait_for_idle(name)
            with OthersMeter() as meter:
                r = run_llama_bench(gguf_path(hf_dir), args.threads, pls, gen, runs)
            quiet["others_cpu_during"] = meter.fraction
            if "error" in r:
                for s in sections:
                    results[s][name] = {"error": r["error"]}
                continue
            wb = weight_bytes_gguf(gguf_path(hf_dir))
            t = r["tests"]
            shared = {"engine": "llama-bench", "weight_bytes": wb, "command": r["command"], **quiet,
                      "info": {k: r.get(k) for k in ("build_commit", "build_number", "model_type", "model_size",
                                                     "n_threads")}}
            if "decode" in sections:
                pp = t.get(f"pp{dec['prompt_len']}", {}).get("median_ts")
                results["decode"][name] = dict(
                    shared, decode_tps=t.get(f"tg{dec['gen']}", {}).get("median_ts"),
                    ttft_s=dec["prompt_len"] / pp if pp else None,
                    note=f"TTFT = {dec['prompt_len']} / pp{dec['prompt_len']} tok/s (prompt processing "
                         f"time, no sampling); decode = tg{dec['gen']} (from an empty context)",
                    samples={k: v["samples_ts"] for k, v in t.items()})
            if "prefill" in sections:
                pp = t.get(f"pp{pre['prompt_len']}", {}).get("median_ts")
                results["prefill"][name] = dict(shared, prefill_tps=pp, ttft_s=pre["prompt_len"] / pp if pp else None,
                                                samples={k: v["samples_ts"] for k, v in t.items()})
            continue
        wname = "llamacpp-py" if name == "llamacpp" else name
        base = system_args(wname, args) + ["--model-dir", hf_dir, "--threads", str(args.threads), "--name", name]
        for s in sections:
            p = dec if s == "decode" else pre
            extra = ["--prompt-len", str(p["prompt_len"]), "--runs", str(runs)]
            if s == "decode":
                extra += ["--gen", str(p["gen"])]
            quiet = wait_for_idle(f"{s} {name}")
            r = run_worker([s, *base, *extra])
            r.update(quiet)
            r["command"] = worker_command(s, wname, args, ["--model-dir", hf_dir, "--threads", str(args.threads),
                                                           *extra])
            results[s][name] = r
            if "error" in r:
                log(f"{s} {name}: {r['error']}")


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
                                     threads=args.threads)


def section_serve(systems: list[str], args, hf_dir: str, results: dict) -> None:
    from llamacpp import LlamaServer, free_port, wait_health
    q = args.quick
    levels = "1,4" if q else args.serve_levels
    max_tokens = 16 if q else args.serve_max_tokens
    load_args = ["--endpoint", "completions", "--levels", levels, "--max-tokens", str(max_tokens),
                 "--prompt-words", str(args.serve_prompt_words)]
    if q:
        load_args += ["--num-requests", "4"]
    else:
        load_args += ["--requests-per-client", str(args.serve_requests_per_client), "--min-requests", "8"]
    serve: dict = {"levels": levels, "max_tokens": max_tokens, "prompt_words": args.serve_prompt_words,
                   "systems": {}}
    results["serve"] = serve
    os.makedirs(OUT_DIR, exist_ok=True)

    def drive(name: str, base_url: str) -> dict:
        out = os.path.join(OUT_DIR, f"serve-{name}.json")
        if os.path.exists(out):
            os.unlink(out)  # never report an earlier run's file
        cmd = [sys.executable, os.path.join(BENCH_DIR, "serve.py"), "--base-url", base_url, *load_args, "--out", out]
        log("running " + " ".join(cmd))
        proc = subprocess.run(cmd, cwd=REPO_DIR)
        if not os.path.exists(out):
            return {"error": f"bench/serve.py exited {proc.returncode} without results"}
        with open(out) as f:
            r = json.load(f)
        r["load_command"] = "python bench/serve.py " + " ".join(cmd[2:])
        if proc.returncode != 0:
            r["warning"] = f"bench/serve.py exited {proc.returncode} (some requests failed)"
        return r

    # lamina
    quiet = wait_for_idle("serve lamina")
    meter = OthersMeter().__enter__()
    port = free_port()
    kv = str(args.serve_kv_cache_memory)
    cmd = [sys.executable, "-m", "lamina", "serve", "--model", args.model, "--port", str(port), "--dtype",
           args.lamina_dtype, "--num-threads", str(args.threads), "--kv-cache-memory", kv, "--no-access-log"]
    log("starting " + " ".join(cmd))
    log_path = os.path.join(OUT_DIR, "lamina-serve.log")
    with open(log_path, "w") as logf:
        env = dict(os.environ, PYTHONPATH=REPO_DIR + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=REPO_DIR, env=env)
        try:
            if wait_health(port, proc, timeout=300):
                r = drive("lamina", f"http://127.0.0.1:{port}/v1")
            else:
                r = {"error": f"lamina serve did not become ready; see {log_path}"}
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    r["server_command"] = "lamina serve " + " ".join(cmd[4:])
    meter.__exit__(None, None, None)
    r.update(quiet, others_cpu_during=meter.fraction)
    serve["systems"]["lamina"] = r

    # llama.cpp
    if any(s.startswith("llamacpp") for s in systems):
        gguf = gguf_path(hf_dir)
        if not llama_bin("llama-server") or not gguf:
            serve["systems"]["llamacpp-server"] = {"skipped": "llama-server not built (bash bench/build_llamacpp.sh)"}
            return
        parallel = args.serve_parallel
        ctx = parallel * args.serve_ctx_per_slot
        quiet = wait_for_idle("serve llamacpp-server")
        try:
            with OthersMeter() as meter, LlamaServer(gguf, parallel=parallel, threads=args.threads, ctx=ctx,
                                                     log_name="llama-server-serve.log") as srv:
                r = drive("llamacpp-server", f"http://127.0.0.1:{srv.port}/v1")
                r["server_command"] = srv.command
        except RuntimeError as e:
            r = {"error": str(e)}
        r.update(quiet, others_cpu_during=meter.fraction)
        serve["systems"]["llamacpp-server"] = r


# --------------------------------------------------------------------------------------------
# report


def busy(r: dict) -> str:
    """A mark for numbers measured while other processes kept the CPUs busy."""
    b = max(r.get("cpu_busy_before") or 0, r.get("others_cpu_during") or 0)
    return f" ⚠{b:.0%}" if b > common.BUSY_THRESHOLD else ""


def ratio(a, b):
    return a / b if a and b else None


def ttft_ms(r: dict) -> str:
    return fmt(r["ttft_s"] * 1000 if r.get("ttft_s") else None)


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
                  "| memory read GB/s | copy GB/s | 1-thread read GB/s | fp32 matmul GFLOP/s | bf16 matmul GFLOP/s |",
                  "|---:|---:|---:|---:|---:|",
                  f"| {fmt(m.get('read_gbps'))} | {fmt(m.get('copy_gbps'))} | {fmt(m.get('read_gbps_1thread_numpy'))} | "
                  f"{fmt(m.get('matmul_fp32_gflops'))} | {fmt(m.get('matmul_bf16_gflops'))} |", "",
                  f"({m.get('read_method')}; {m.get('matmul_method')})", ""]
    lamina_names = [n for n in res.get("systems", []) if n.startswith("lamina")]

    def ratio_cols(section: str, key: str, higher_is_better: bool = True) -> list[str]:
        """'lamina / peer' for the first lamina system and each peer."""
        sec = res.get(section, {})
        out = []
        if not lamina_names or lamina_names[0] not in sec:
            return out
        base = sec[lamina_names[0]].get(key)
        for name, r in sec.items():
            if name.startswith("lamina") or not r.get(key):
                continue
            v = ratio(base, r[key])
            out.append(f"{lamina_names[0]} / {name}: **{v:.2f}x**" if v else f"{lamina_names[0]} / {name}: –")
        return out

    if res.get("decode"):
        d = res["decode"]
        cfg = res["config"]["decode"]
        lines += [f"## Decode (single stream: {cfg['prompt_len']}-token prompt, {cfg['gen']} new tokens, "
                  f"median of {cfg['runs']})", "",
                  "| system | TTFT (ms) | decode tok/s | weights read / token (MB) | achieved GB/s | % of bandwidth "
                  "| roofline tok/s |", "|---|---:|---:|---:|---:|---:|---:|"]
        lines += system_rows(d, lambda r: [ttft_ms(r), fmt(r.get("decode_tps")), fmt((r.get("weight_bytes") or 0) / 1e6),
                                           fmt(r.get("achieved_gbps"), 2), fmt(r.get("pct_of_bandwidth")),
                                           fmt(r.get("roofline_tps"))])
        ref = next((n for n in ("hf-fp32", "hf-bf16") if (d.get(n, {}).get("runs") or [{}])[0].get("first_tokens")),
                   None)
        agree = []
        for name, r in d.items():
            toks = (r.get("runs") or [{}])[0].get("first_tokens")
            if ref and toks and name != ref:
                same = sum(a == b for a, b in zip(toks, d[ref]["runs"][0]["first_tokens"]))
                agree.append(f"{name} {same}/{len(toks)}")
        if agree:
            lines += ["", f"Greedy tokens of run 1 equal to {ref}'s (first 16): " + ", ".join(agree) + "."]
        if ratio_cols("decode", "decode_tps"):
            lines += ["", "Decode tok/s ratios: " + "; ".join(ratio_cols("decode", "decode_tps")) + "  ",
                      "TTFT ratios (lower is better for lamina): " + "; ".join(ratio_cols("decode", "ttft_s"))]
        lines.append("")
    if res.get("prefill"):
        p = res["prefill"]
        cfg = res["config"]["prefill"]
        lines += [f"## Prefill ({cfg['prompt_len']}-token prompt, 1 new token, median of {cfg['runs']})", "",
                  "| system | TTFT (ms) | prefill tok/s | GFLOP/s | % of matmul peak |", "|---|---:|---:|---:|---:|"]
        lines += system_rows(p, lambda r: [ttft_ms(r), fmt(r.get("prefill_tps")), fmt(r.get("gflops")),
                                           fmt(r.get("pct_of_matmul_peak"))])
        if ratio_cols("prefill", "prefill_tps"):
            lines += ["", "Prefill tok/s ratios: " + "; ".join(ratio_cols("prefill", "prefill_tps"))]
        lines.append("")
    if res.get("offline"):
        from offline import markdown as offline_md
        lines += ["## Offline throughput", "", offline_md(res["offline"]), ""]
    if res.get("serve"):
        s = res["serve"]
        lines += [f"## Serving sweep (bench/serve.py, /v1/completions streaming, ~{s['prompt_words']}-word prompts, "
                  f"{s['max_tokens']} tokens each, EOS ignored)", "",
                  "| system | concurrency | ok/requests | output tok/s | TTFT p50 / p95 / p99 (ms) | "
                  "ITL p50 / p95 / p99 (ms) | GET /health p50 / max (ms) | prompt tokens |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        by_level: dict = {}
        for name, r in s["systems"].items():
            if "levels" not in r:
                lines.append(f"| {name} | {r.get('skipped') or r.get('error')} | | | | | | |")
                continue
            for lv in r["levels"]:
                t, i = lv["ttft_s"], lv["itl_s"]
                h = lv.get("health_s") or {}

                def ms(x):
                    return fmt(x * 1000 if x is not None else None)
                lines.append(f"| {name}{busy(r)} | {lv['concurrency']} | {lv['completed']}/{lv['requests']} | "
                             f"{fmt(lv['output_tokens_per_s'])} | {ms(t['p50'])} / {ms(t['p95'])} / {ms(t['p99'])} | "
                             f"{ms(i['p50'])} / {ms(i['p95'])} / {ms(i['p99'])} | {ms(h.get('p50'))} / {ms(h.get('max'))} | "
                             f"{fmt(lv.get('mean_prompt_tokens'))} |")
                by_level.setdefault(lv["concurrency"], {})[name] = lv
        rows = []
        for c, lv in sorted(by_level.items()):
            a, b = lv.get("lamina"), lv.get("llamacpp-server")
            if a and b:
                rows.append(f"| {c} | {fmt(ratio(a['output_tokens_per_s'], b['output_tokens_per_s']), 2)}x | "
                            f"{fmt(ratio(a['ttft_s']['p50'], b['ttft_s']['p50']), 2)}x | "
                            f"{fmt(ratio(a['itl_s']['p50'], b['itl_s']['p50']), 2)}x |")
        if rows:
            lines += ["", "| concurrency | output tok/s lamina / llama.cpp | TTFT p50 lamina / llama.cpp | "
                          "ITL p50 lamina / llama.cpp |", "|---:|---:|---:|---:|", *rows]
        lines.append("")
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
            lines.append(f"- serve / {name}: `{r['server_command']}` driven by `{r.get('load_command', '')}`")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lamina bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections (default: all)")
    ap.add_argument("--quick", action="store_true", help="a fast smoke run of every selected section")
    ap.add_argument("--systems", default=None,
                    help=f"comma-separated, from {', '.join(ALL_SYSTEMS)} (default: {DEFAULT_SYSTEMS}; "
                         f"--quick: {QUICK_SYSTEMS})")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--lamina-dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of every system (default: all)")
    ap.add_argument("--runs", type=int, default=3, help="runs per latency number; the median is reported")
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

    t_start = time.time()
    hf_dir = model_dir(args.model)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    res: dict = {"meta": {"started": started, "command": "python bench/run.py " + " ".join(raw),
                          "model": args.model, "model_dir": hf_dir, "threads": args.threads,
                          "machine": machine_description(), "versions": versions(), "load_at_start": load()},
                 "systems": systems, "sections": sections,
                 "config": {"decode": {"prompt_len": 48, "gen": 32 if args.quick else 256,
                                       "runs": 1 if args.quick else args.runs},
                            "prefill": {"prompt_len": 128 if args.quick else 512, "runs": 1 if args.quick else args.runs},
                            "quick": args.quick}}
    log(f"sections {','.join(sections)}; systems {','.join(systems)}; model dir {hf_dir}")

    if not args.no_machine:
        log("measuring memory bandwidth and matmul peak")
        quiet = wait_for_idle("machine")
        res["machine"] = run_worker(["machine", "--threads", str(args.threads)] + (["--quick"] if args.quick else []))
        res["machine"].update(quiet)
        log(f"read {res['machine'].get('read_gbps', 0):.1f} GB/s, fp32 {res['machine'].get('matmul_fp32_gflops', 0):.0f}"
            f" GFLOP/s, bf16 {res['machine'].get('matmul_bf16_gflops', 0):.0f} GFLOP/s")

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
    res["meta"]["load_at_end"] = load()
    md = save()
    print(md)
    log(f"wrote {stem}.json and {stem}.md ({res['meta']['elapsed_s']:.0f}s)")
    if "serve" in sections and have_module("matplotlib"):
        subprocess.run([sys.executable, os.path.join(BENCH_DIR, "plot.py"), stem + ".json"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
