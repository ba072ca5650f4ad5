"""Time to first answer: seconds from launching a process until it has answered its first request,
for lamina (as a server and as a library) and llama.cpp's llama-server, on the same model.

    python bench/first_answer.py                  # every system, 3 interleaved rounds
    python bench/first_answer.py --quick          # 1 round, first answers only
    python bench/first_answer.py --systems lamina-serve-cold,llama-server --rounds 5

Systems
  lamina-serve-cold  `lamina serve --model M --port P` (its defaults: compiled steps on CPU) with an
                     empty Inductor cache (TORCHINDUCTOR_CACHE_DIR = a fresh temporary directory) and
                     no kernel dispatch cache (the $LAMINA_HOME/kernels/dispatch-*.json files are
                     removed, so the launch measures its kernels as a first start does)
  lamina-serve-warm  the same with Inductor's default cache, filled by a priming launch first
  llama-server       `llama-server -m source.gguf --host 127.0.0.1 --port P` (its defaults), on the
                     GGUF lamina's model was converted from
  lamina-llm-cold    a fresh `python` that imports lamina, builds `LLM(M)` and runs its first
                     `generate` (8 tokens), with an empty Inductor cache and no dispatch cache
  lamina-llm-warm    the same with the default cache

What is measured
  first answer  launch -> the first successful response. A server is polled with a short
                POST /v1/chat/completions (8 tokens, temperature 0) every 50 ms until one
                answers 200 (connection refused and 503 "loading" are retried); the library's
                time is its process's wall clock at the end of the first generate.
  full speed    launch -> lamina's log line "compiled steps ready" (lamina compiles its steps in
                the background and serves eagerly meanwhile); empty where no such line comes
                (llama-server; `--enforce-eager`; a lamina that compiles before it serves, whose
                first answer is then already at full speed). --no-full-speed stops each launch
                at its first answer.

Not measured: downloading and converting the model (pulled before the rounds) and building
lamina's C++ kernels (built once, before). The model's files are in the OS page cache for every
system after the first launch; this is a process start, not a machine boot. Each number is the
median over rounds with its range; each ratio the median of per-round ratios. Rounds interleave
the systems, order rotating (bench/common.py's interleave()).
"""
from __future__ import annotations

import argparse
import glob
import http.client
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from common import (COMPILE_FAILED, COMPILE_READY, COMPILE_STARTED, OUT_DIR, REPO_DIR, find_in_log,  # noqa: E402
                    fmt_spread, free_port, gguf_path, interleave, launch, llama_bin, log, model_dir,
                    protocol_stdout, round_ratios, spread, stop, wait_for_idle)

SYSTEMS = ("lamina-serve-cold", "lamina-serve-warm", "llama-server", "lamina-llm-cold", "lamina-llm-warm")
QUESTION = [{"role": "user", "content": "Say hi."}]
MAX_TOKENS = 8


# --------------------------------------------------------------------------------------------
# the library, in a child process: `python bench/first_answer.py --child-llm MODEL`


def child_llm(model: str) -> int:
    """Report (on stdout, one JSON line each) when the interpreter started, lamina was imported,
    LLM(...) returned and the first generate ended; then keep the engine alive (its background
    compile too) until the parent closes stdin."""
    proto = protocol_stdout()

    def event(name: str) -> None:
        proto.write(json.dumps({"event": name, "t": time.time()}) + "\n")

    event("started")
    import logging
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from lamina import LLM, SamplingParams
    event("imported")
    llm = LLM(model)
    event("constructed")
    out = llm.generate("Say hi.", SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
    if not out or not out[0].outputs[0].token_ids:
        event("no_output")
        return 1
    event("first_answer")
    sys.stdin.read()
    return 0


# --------------------------------------------------------------------------------------------
# one launch


def ask(port: int, timeout: float) -> bool:
    """One short chat completion; True on a 200 with a choice. Raises what a server that is not
    ready yet produces (refused connection, 503); other HTTP errors raise RuntimeError."""
    body = json.dumps({"messages": QUESTION, "max_tokens": MAX_TOKENS, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status == 200 and bool(json.loads(r.read()).get("choices"))
    except urllib.error.HTTPError as e:
        if e.code == 503:
            raise ConnectionRefusedError("503") from e
        raise RuntimeError(f"HTTP {e.code}: {e.read()[:300]!r}") from e


def watch_full_speed(log_path: str, proc: subprocess.Popen, t0: float, timeout: float) -> dict:
    """Seconds from launch until lamina logs that its compiled steps are ready (polled every 0.2 s)."""
    if not find_in_log(log_path, COMPILE_STARTED):
        return {"full_speed": "no background compile in the log"}
    deadline = time.time() + timeout
    while time.time() < deadline:
        if find_in_log(log_path, COMPILE_READY):
            return {"full_speed_s": time.time() - t0}
        if find_in_log(log_path, COMPILE_FAILED):
            return {"full_speed": "compile failed (see the log)"}
        if proc.poll() is not None:
            return {"full_speed": f"exited with {proc.returncode} while compiling"}
        time.sleep(0.2)
    return {"full_speed": f"not ready within {timeout:.0f}s"}


def launch_server(cmd: list[str], port: int, log_path: str, env: dict, deadline: float, full_speed: bool,
                  full_speed_timeout: float) -> dict:
    t0 = time.time()
    proc = launch(cmd, log_path, env)
    try:
        while True:
            if proc.poll() is not None:
                return {"error": f"exited with {proc.returncode} before answering; see {log_path}"}
            left = deadline - (time.time() - t0)
            if left <= 0:
                return {"error": f"no answer within {deadline:.0f}s; see {log_path}"}
            try:
                if ask(port, timeout=left):
                    break
            except RuntimeError as e:
                return {"error": f"{e}; see {log_path}"}
            except (OSError, http.client.HTTPException):  # refused, reset, 503, a timeout
                pass
            time.sleep(0.05)
        out = {"first_answer_s": time.time() - t0}
        if full_speed:
            out.update(watch_full_speed(log_path, proc, t0, full_speed_timeout))
        return out
    finally:
        stop(proc)


def launch_llm(model: str, log_path: str, env: dict, deadline: float, full_speed: bool,
               full_speed_timeout: float) -> dict:
    full_env = dict(os.environ, PYTHONPATH=REPO_DIR + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    t0 = time.time()
    with open(log_path, "w") as logf:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child-llm", model], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=logf, env=full_env, cwd=REPO_DIR, text=True,
                                start_new_session=True)
    events: dict = {}
    try:
        while "first_answer" not in events:
            left = deadline - (time.time() - t0)
            if left <= 0:
                return {"error": f"no answer within {deadline:.0f}s; see {log_path}"}
            ready, _, _ = select.select([proc.stdout], [], [], min(left, 1.0))
            if ready:
                line = proc.stdout.readline()
                if not line:
                    return {"error": f"exited with {proc.wait()} before answering; see {log_path}"}
                e = json.loads(line)
                events[e["event"]] = e["t"] - t0
        out = {"first_answer_s": events["first_answer"], "python_start_s": events.get("started"),
               "import_s": events["imported"] - events["started"],
               "construct_s": events["constructed"] - events["imported"],
               "first_generate_s": events["first_answer"] - events["constructed"]}
        if full_speed:
            out.update(watch_full_speed(log_path, proc, t0, full_speed_timeout))
        return out
    finally:
        try:
            proc.stdin.close()
        except OSError:
            pass
        stop(proc)


# --------------------------------------------------------------------------------------------
# the benchmark


def run_first_answer(model: str, systems: list[str], rounds: int = 3, full_speed: bool = True,
                     deadline: float = 900, full_speed_timeout: float = 1800, threads: int | None = None) -> dict:
    hf_dir = model_dir(model)  # pulled (and converted) now, outside every measurement
    # lamina's C++ kernels are built once per machine: build them now too, so no launch pays for it
    built = subprocess.run([sys.executable, "-c", "from lamina.kernels import cpu_build; print(bool(cpu_build.load()))"],
                           capture_output=True, text=True, cwd=REPO_DIR,
                           env=dict(os.environ, PYTHONPATH=REPO_DIR + os.pathsep + os.environ.get("PYTHONPATH", "")))
    log(f"first answer: lamina's C++ kernels loaded: {built.stdout.strip() or built.stderr.strip()[-300:]}")
    gguf = gguf_path(hf_dir)
    os.makedirs(OUT_DIR, exist_ok=True)
    thread_args = ["--num-threads", str(threads)] if threads else []
    llama_thread_args = ["-t", str(threads), "-tb", str(threads)] if threads else []
    res: dict = {"config": {"model": model, "model_dir": hf_dir, "rounds": rounds, "full_speed": full_speed,
                            "question": QUESTION, "max_tokens": MAX_TOKENS, "threads": threads},
                 "systems": {}, "commands": {}}
    names = []
    for name in systems:
        if name not in SYSTEMS:
            raise SystemExit(f"unknown system {name!r}; choose from {', '.join(SYSTEMS)}")
        if name == "llama-server" and not (llama_bin("llama-server") and gguf):
            res["systems"][name] = {"skipped": "llama-server not built (bash bench/build_llamacpp.sh) or no source.gguf"}
            continue
        names.append(name)

    def serve_cmd(port: int) -> list[str]:
        return [sys.executable, "-m", "lamina", "serve", "--model", model, "--port", str(port), *thread_args]

    def one(name: str, label: str, watch: bool) -> dict:
        """One launch of `name` (watch: until lamina's compiled steps are ready too); its log is
        bench/out/first-answer-<label>.log."""
        log_path = os.path.join(OUT_DIR, f"first-answer-{label}.log")
        cold = name.endswith("-cold")
        cache = tempfile.mkdtemp(prefix="lamina-inductor-cold-") if cold else None
        env = {"TORCHINDUCTOR_CACHE_DIR": cache} if cold else {}
        if cold:   # a first start measures which kernels to use: so must this one
            from lamina.envs import lamina_home
            for path in glob.glob(os.path.join(lamina_home(), "kernels", "dispatch-*.json")):
                os.remove(path)
        port = free_port()
        try:
            if name == "llama-server":
                cmd = [llama_bin("llama-server"), "-m", gguf, "--host", "127.0.0.1", "--port", str(port),
                       *llama_thread_args]
                res["commands"][name] = " ".join(cmd)
                return launch_server(cmd, port, log_path, env, deadline, False, 0)
            if name.startswith("lamina-serve"):
                cmd = serve_cmd(port)
                res["commands"][name] = ("TORCHINDUCTOR_CACHE_DIR=<new empty dir>, no dispatch cache: " if cold else "") + \
                    "lamina serve " + " ".join(cmd[4:])
                return launch_server(cmd, port, log_path, env, deadline, watch, full_speed_timeout)
            res["commands"][name] = ("TORCHINDUCTOR_CACHE_DIR=<new empty dir>, no dispatch cache: " if cold else "") + \
                f"python -c \"from lamina import LLM, SamplingParams; LLM('{model}').generate('Say hi.', " \
                f"SamplingParams(max_tokens={MAX_TOKENS}, temperature=0))\""
            return launch_llm(model, log_path, env, deadline, watch, full_speed_timeout)
        finally:
            if cache:
                shutil.rmtree(cache, ignore_errors=True)

    # warm means Inductor's default cache holds these graphs: one unmeasured launch of each warm
    # system fills it (and waits for its compile to finish)
    res["prime"] = {}
    for name in names:
        if name.endswith("-warm"):
            log(f"first answer: priming Inductor's default cache with one unmeasured {name} launch")
            res["prime"][name] = one(name, f"{name}-prime", watch=True)

    def measure(name: str, r: int) -> dict:
        quiet = wait_for_idle(f"first answer {name} round {r + 1}/{rounds}")
        with common.OthersMeter() as meter:
            out = one(name, f"{name}-{r}", watch=full_speed)
        out.update(quiet, others_cpu_during=meter.fraction, round=r)
        log(f"first answer {name} round {r + 1}: " + (
            out["error"] if "error" in out else
            f"{out['first_answer_s']:.2f}s" + (f", full speed at {out['full_speed_s']:.1f}s"
                                                if out.get("full_speed_s") else f" ({out.get('full_speed', '')})")))
        return out

    per_round = interleave(names, rounds, measure)
    for name, runs in per_round.items():
        ok = [x for x in runs if "error" not in x]
        r = {"first_answer_s": spread([x["first_answer_s"] for x in ok]),
             "full_speed_s": spread([x.get("full_speed_s") for x in ok]),
             "cpu_busy_before": max([x.get("cpu_busy_before") or 0 for x in runs] or [0]),
             "others_cpu_during": max([x.get("others_cpu_during") or 0 for x in runs] or [0]),
             "command": res["commands"].get(name), "rounds": runs}
        notes = sorted({x["full_speed"] for x in ok if x.get("full_speed")})
        if notes:
            r["full_speed_note"] = "; ".join(notes)
        if not ok:
            r["error"] = runs[0].get("error") if runs else "no rounds"
        res["systems"][name] = r
    res["ratios"] = {}
    if "llama-server" in per_round:
        base = [x.get("first_answer_s") for x in per_round["llama-server"]]
        for name in names:
            if name != "llama-server":
                rr = round_ratios([x.get("first_answer_s") for x in per_round[name]], base)
                if rr:
                    res["ratios"][f"{name} / llama-server"] = rr
    return res


def markdown(res: dict) -> str:
    cfg = res["config"]

    def secs(s: dict | None) -> str:
        if not s:
            return "–"
        return f"{s['median']:.2f}" + (f" ({s['min']:.2f}–{s['max']:.2f})" if s["n"] > 1 else "")

    lines = [f"Seconds from launching the process to its first answer (a {cfg['max_tokens']}-token chat completion; "
             f"the library: `LLM(...)` + its first `generate`), and to lamina's full compiled speed; median of "
             f"{cfg['rounds']} interleaved rounds (min–max).", "",
             "| system | first answer (s) | full compiled speed (s) | first answer / llama-server's |",
             "|---|---:|---:|---:|"]
    for name, r in res["systems"].items():
        if "skipped" in r or "error" in r:
            lines.append(f"| {name} | {r.get('skipped') or r.get('error')} | | |")
            continue
        b = max(r.get("cpu_busy_before") or 0, r.get("others_cpu_during") or 0)
        label = name + (f" ⚠{b:.0%}" if b > common.BUSY_THRESHOLD else "")
        full = secs(r["full_speed_s"]) if r.get("full_speed_s") else (r.get("full_speed_note") or "–")
        lines.append(f"| {label} | {secs(r['first_answer_s'])} | {full} | "
                     f"{fmt_spread(res['ratios'].get(f'{name} / llama-server'))} |")
    llm = [x for n, r in res["systems"].items() if n.startswith("lamina-llm") for x in r.get("rounds", [])
           if "construct_s" in x]
    if llm:
        lines += ["", "The library's first answer, split (median over every lamina-llm launch): python start "
                      f"{spread([x['python_start_s'] for x in llm])['median']:.2f} s, import lamina "
                      f"{spread([x['import_s'] for x in llm])['median']:.2f} s, `LLM(...)` "
                      f"{spread([x['construct_s'] for x in llm])['median']:.2f} s, first generate "
                      f"{spread([x['first_generate_s'] for x in llm])['median']:.2f} s."]
    lines += ["", "Commands: " + "; ".join(f"{n}: `{c}`" for n, c in res["commands"].items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child-llm", metavar="MODEL", help=argparse.SUPPRESS)
    ap.add_argument("--model", default=common.DEFAULT_MODEL)
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; --quick 1)")
    ap.add_argument("--quick", action="store_true", help="one round, first answers only")
    ap.add_argument("--no-full-speed", action="store_true",
                    help="stop each launch at its first answer instead of waiting for lamina's compiled steps")
    ap.add_argument("--deadline", type=float, default=900, help="seconds a launch may take to answer")
    ap.add_argument("--full-speed-timeout", type=float, default=1800)
    ap.add_argument("--threads", type=int, default=None,
                    help="pass a thread count to every system (default: each system's own default)")
    ap.add_argument("--wait-idle", type=float, default=120.0,
                    help="wait up to this many seconds for a quiet machine before each launch (default: %(default)s)")
    ap.add_argument("--json", default=None, help="default: bench/out/first-answer-<time>.json")
    args = ap.parse_args(argv)
    if args.child_llm:
        return child_llm(args.child_llm)
    common.WAIT_IDLE_S = args.wait_idle
    res = run_first_answer(args.model, [s for s in args.systems.split(",") if s],
                           rounds=args.rounds or (1 if args.quick else 3),
                           full_speed=not (args.no_full_speed or args.quick), deadline=args.deadline,
                           full_speed_timeout=args.full_speed_timeout, threads=args.threads)
    path = args.json or os.path.join(OUT_DIR, f"first-answer-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(markdown(res))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
