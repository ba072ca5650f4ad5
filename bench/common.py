"""The harness every bench script shares: paths, the workload's prompt token ids, systems in their
own processes (one-shot, or loaded once and given tasks round after round), servers launched as
real processes, interleaved rounds and the statistics of their ratios, a quiet-machine guard, and
the bytes of weights a decode step reads.

Nothing here imports torch at module level: the orchestrator (bench/run.py) stays light, and every
system runs in its own subprocess (bench/workers.py) so threads and memory never interfere.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)
OUT_DIR = os.path.join(BENCH_DIR, "out")
PEERS_DIR = os.path.join(BENCH_DIR, "peers")
PEERS_BIN = os.path.join(PEERS_DIR, "bin")
sys.path.insert(0, REPO_DIR)
from lamina.config import DEFAULT_MODEL  # noqa: E402  (light: no torch)

# First token ids of SmolLM2's vocabulary are special (<|endoftext|>, <|im_start|>, ...): prompts
# draw ordinary tokens above them.
FIRST_ORDINARY_TOKEN = 100


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def model_dir(model: str = DEFAULT_MODEL) -> str:
    """The converted Hugging Face directory of a lamina registry model (config.json, model.safetensors,
    tokenizer.json, source.gguf). Pulls the model the first time."""
    if os.path.isdir(model):
        return os.path.abspath(model)
    from lamina.registry import resolve_model
    return resolve_model(model)


def gguf_path(hf_dir: str) -> str | None:
    path = os.path.join(hf_dir, "source.gguf")
    return path if os.path.exists(path) else None


def vocab_size(hf_dir: str) -> int:
    with open(os.path.join(hf_dir, "config.json")) as f:
        return int(json.load(f)["vocab_size"])


def kv_bytes_per_token(hf_dir: str, element_size: int) -> int:
    """K and V of one token over all layers."""
    with open(os.path.join(hf_dir, "config.json")) as f:
        c = json.load(f)
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    kv_heads = c.get("num_key_value_heads") or c["num_attention_heads"]
    return 2 * c["num_hidden_layers"] * kv_heads * head_dim * element_size


def random_prompt(vocab: int, length: int, seed: int) -> list[int]:
    """`length` ordinary token ids, a pure function of (vocab, length, seed): every system gets the
    very same ids. Different seeds give prompts that differ from their first token, so no run hits
    another run's prefix cache."""
    import random
    rng = random.Random(seed * 1_000_003 + length)
    lo = min(FIRST_ORDINARY_TOKEN, vocab // 2)  # tiny test vocabularies too
    return [rng.randrange(lo, vocab) for _ in range(length)]


def mixed_prompts(vocab: int, n: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    """`n` prompts with lengths drawn uniformly from [lo, hi] (fixed seed)."""
    import random
    rng = random.Random(seed)
    lengths = [rng.randint(lo, hi) for _ in range(n)]
    return [random_prompt(vocab, length, seed=10_000 + seed * 100_000 + i) for i, length in enumerate(lengths)]


def batches_by_length(prompts: list[list[int]], batch_size: int, sort: bool = True) -> list[list[int]]:
    """Indices of each batch: the prompts sorted by length first (each batch then pads only to
    prompts of about its own length, as a careful user of a padded batch API does), or in order."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i])) if sort else list(range(len(prompts)))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def padded_tokens(prompts: list[list[int]], batches: list[list[int]]) -> int:
    """Prompt tokens a left-padded batched generate processes: each batch's width x its rows."""
    return sum(max(len(prompts[i]) for i in b) * len(b) for b in batches)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def median_seconds(fn, rounds: int, warmup: int = 1) -> float:
    """The median wall time of `rounds` calls of fn() after `warmup` calls (CPU micro-benchmarks)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def summarize(runs: list[dict], keys: list[str]) -> dict:
    """Median of each key over runs, plus the raw per-run values."""
    out = {k: median([r.get(k) for r in runs]) for k in keys}
    out["runs"] = runs
    return out


# --------------------------------------------------------------------------------------------
# rounds: every headline number is a median over rounds, every ratio a median of per-round ratios
#
# These VMs' speed drifts (up to 2x within minutes). Measuring system A for ten minutes and then B
# would put that drift into A / B. So each round measures every system once, back to back, and a
# ratio is taken within each round; the report gives the median of those ratios and their range.


def interleave(names: list[str], rounds: int, measure) -> dict[str, list]:
    """`measure(name, round)` for every name, round by round: A B C, B C A, C A B, ... (the order
    rotates, so no system always runs first or always follows the same neighbour). Returns each
    name's results in round order."""
    out: dict[str, list] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names) if names else 0
        for name in names[k:] + names[:k]:
            out[name].append(measure(name, r))
    return out


def spread(values) -> dict | None:
    """Median, min, max and count of the values that exist (None where none does)."""
    xs = [x for x in values if x is not None]
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def round_ratios(a: list, b: list) -> dict | None:
    """a[i] / b[i] for every round i where both exist, as spread() plus the ratios themselves."""
    ratios = [x / y for x, y in zip(a, b) if x is not None and y]
    s = spread(ratios)
    if s:
        s["ratios"] = ratios
    return s


def fmt_spread(s: dict | None, unit: str = "x", digits: int = 2) -> str:
    """'1.63x (1.55–1.70, 3 rounds)'; a single round shows no range."""
    if not s:
        return "–"
    med = f"{s['median']:.{digits}f}{unit}"
    if s["n"] < 2:
        return f"{med} (1 round)"
    return f"{med} ({s['min']:.{digits}f}–{s['max']:.{digits}f}, {s['n']} rounds)"


def median_tree(items: list):
    """The element-wise median of equally shaped JSON values: numbers become their median, dicts
    and lists recurse, anything else keeps the first item's value. Summarizes rounds of a nested
    result (a serving sweep) in the shape of one round."""
    items = [x for x in items if x is not None]
    if not items:
        return None
    first = items[0]
    if isinstance(first, bool) or not isinstance(first, (int, float, dict, list)):
        return first
    if isinstance(first, (int, float)):
        m = median([x for x in items if isinstance(x, (int, float))])
        return int(m) if isinstance(first, int) and float(m).is_integer() else m
    if isinstance(first, dict):
        return {k: median_tree([x.get(k) for x in items if isinstance(x, dict)]) for k in first}
    if all(isinstance(x, list) and len(x) == len(first) for x in items):
        return [median_tree([x[i] for x in items]) for i in range(len(first))]
    return first


def run_worker(args: list[str], timeout: float | None = None, env: dict | None = None) -> dict:
    """Run `python bench/workers.py ARGS --out FILE` in a fresh process and return the JSON it wrote.
    Its stderr goes straight to ours (progress); a failure returns {"error": ...}."""
    fd, out = tempfile.mkstemp(prefix="lamina-bench-", suffix=".json")
    os.close(fd)
    cmd = [sys.executable, os.path.join(BENCH_DIR, "workers.py"), *args, "--out", out]
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = REPO_DIR + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env or {})
    t0 = time.time()
    try:
        with OthersMeter() as meter:
            proc = subprocess.run(cmd, stdout=sys.stderr, env=full_env, timeout=timeout, cwd=REPO_DIR)
        if proc.returncode != 0:
            return {"error": f"worker exited with {proc.returncode}: {' '.join(args)}"}
        with open(out) as f:
            result = json.load(f)
        result.setdefault("wall_s", round(time.time() - t0, 2))
        result["others_cpu_during"] = meter.fraction
        return result
    except subprocess.TimeoutExpired:
        return {"error": f"worker timed out after {timeout}s: {' '.join(args)}"}
    except (OSError, ValueError) as e:
        return {"error": f"worker failed: {e}"}
    finally:
        try:
            os.unlink(out)
        except OSError:
            pass


class Worker:
    """One system loaded once, in a process of its own (`python bench/workers.py loop ARGS`), then
    given tasks one at a time: round after round on the same loaded model, with no reload between
    rounds. The protocol is one JSON object per line on the worker's stdin and stdout (the worker
    sends its own prints to stderr, which is ours). An idle worker blocks on its stdin, using no CPU.

        w = Worker(["--engine", "lamina", "--model-dir", d])   # returns once the model is loaded
        w.ready          # {"engine", "weight_bytes", "info"} or {"error": ...}
        w.call("latency", prompt_len=48, gen=256, seeds=[1])
        w.close()
    """

    def __init__(self, args: list[str], env: dict | None = None, repo: str = REPO_DIR):
        """`repo`: the lamina checkout whose bench/workers.py (and so whose lamina) runs."""
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = repo + os.pathsep + full_env.get("PYTHONPATH", "")
        full_env.update(env or {})
        self.args = args
        self.proc = subprocess.Popen([sys.executable, os.path.join(repo, "bench", "workers.py"), "loop", *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=full_env, cwd=repo,
                                     text=True, bufsize=1)
        self.ready = self._read() or {"error": f"worker exited with {self.proc.poll()} while loading"}

    @property
    def ok(self) -> bool:
        return "error" not in self.ready

    def _read(self) -> dict | None:
        line = self.proc.stdout.readline()
        return json.loads(line) if line else None

    def call(self, task: str, **params) -> dict:
        if not self.ok or self.proc.poll() is not None:
            return {"error": self.ready.get("error") or f"worker exited with {self.proc.poll()}"}
        try:
            self.proc.stdin.write(json.dumps({"task": task, **params}) + "\n")
            self.proc.stdin.flush()
        except OSError as e:
            return {"error": f"worker gone: {e}"}
        return self._read() or {"error": f"worker exited with {self.proc.wait()} during {task}"}

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # end of input: the loop returns
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def protocol_stdout():
    """For a child process that talks JSON lines on stdout: returns a line-buffered file on the
    original stdout and points file descriptor 1 at stderr, so nothing else (a library's print, a
    progress bar) can corrupt the protocol."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    return proto


# --------------------------------------------------------------------------------------------
# servers as real processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cmd: list[str], log_path: str, env: dict | None = None) -> subprocess.Popen:
    """Start a server (or any long-lived process) in a session of its own, its stdout and stderr
    into log_path; stop() ends it with every process it started."""
    os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = REPO_DIR + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env or {})
    with open(log_path, "w") as logf:
        return subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO_DIR,
                                env=full_env, start_new_session=True)


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM to the process group launch() made, SIGKILL after `timeout` seconds."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        proc.wait()


def wait_health(port: int, proc: subprocess.Popen, timeout: float) -> bool:
    """Poll GET /health until it answers 200 (True), the process exits or time runs out (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    return False


# lamina's log lines about its background compile (lamina/engine/compiled_steps.py): serving starts
# eagerly at once; full compiled speed comes with the "ready" line.
COMPILE_STARTED = re.compile(r"compiling .* in the background")
COMPILE_READY = re.compile(r"compiled steps ready")
COMPILE_FAILED = re.compile(r"compiling .* failed")


def find_in_log(path: str, pattern: re.Pattern, start: int = 0) -> bool:
    try:
        with open(path, errors="replace") as f:
            f.seek(start)
            return bool(pattern.search(f.read()))
    except OSError:
        return False


def wait_compiled(log_path: str, proc: subprocess.Popen, timeout: float) -> str:
    """After a lamina server answered: if its log says it compiles in the background, wait until it
    says the compiled steps are ready. Returns "ready", "failed", "not compiling" (no background
    compile: eager, or an older lamina that compiled before serving), "exited" or "timeout"."""
    if not find_in_log(log_path, COMPILE_STARTED):
        return "not compiling"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if find_in_log(log_path, COMPILE_READY):
            return "ready"
        if find_in_log(log_path, COMPILE_FAILED):
            return "failed"
        if proc.poll() is not None:
            return "exited"
        time.sleep(0.5)
    return "timeout"


def cpu_busy(interval: float = 1.0) -> float | None:
    """Fraction of the machine's CPU time spent busy over `interval` seconds (/proc/stat), i.e. what
    other processes use while the suite itself sleeps. None where /proc/stat does not exist."""
    def sample():
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
        return sum(vals[:8]), idle
    try:
        t0, i0 = sample()
        time.sleep(interval)
        t1, i1 = sample()
    except OSError:
        return None
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)



WAIT_IDLE_S = float(os.environ.get("LAMINA_BENCH_WAIT_IDLE", "0"))
BUSY_THRESHOLD = 0.15

from lamina.cpu_features import OthersMeter  # noqa: E402,F401  (bench scripts use common.OthersMeter)


def wait_for_idle(what: str, max_wait: float | None = None) -> dict:
    """Before a measurement: wait (up to max_wait seconds, default $LAMINA_BENCH_WAIT_IDLE) until other
    processes use less than 15% of the CPUs, and say how busy the machine was. Threads that share a
    core with another busy process make every multi-threaded engine collapse, so a number measured on
    a busy machine is flagged in the report."""
    max_wait = WAIT_IDLE_S if max_wait is None else max_wait
    t0 = time.time()
    busy = cpu_busy()
    while busy is not None and busy > BUSY_THRESHOLD and time.time() - t0 < max_wait:
        log(f"{what}: other processes use {busy:.0%} of the CPUs; waiting for a quiet machine "
            f"({max_wait - (time.time() - t0):.0f}s left)")
        time.sleep(4)
        busy = cpu_busy()
    if busy is not None and busy > BUSY_THRESHOLD:
        log(f"{what}: measuring on a busy machine (other processes use {busy:.0%} of the CPUs)")
    return {"cpu_busy_before": None if busy is None else round(busy, 3), "waited_s": round(time.time() - t0, 1)}


def llama_bin(name: str) -> str | None:
    """bench/peers/bin/NAME (built by bench/build_llamacpp.sh), else NAME on $PATH."""
    path = os.path.join(PEERS_BIN, name)
    if os.access(path, os.X_OK):
        return path
    return shutil.which(name)


def llamacpp_build_info() -> dict:
    info = {}
    path = os.path.join(PEERS_BIN, "BUILD_INFO")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if "=" in line:
                    k, v = line.rstrip("\n").split("=", 1)
                    info[k] = v
    return info


def have_module(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


def weight_bytes_torch(model) -> int:
    """Bytes of weights one decode step reads: every tensor of every module except embedding tables
    (a lookup reads one row), counting each storage once; a tied lm_head counts the table once, as
    the lm_head. Buffers count only when they are weights (`weight`, `scale`, `bias`: int8 linears;
    `minimum`: int4 without lamina's kernels; `packed`: int8/int4/bf16 weights packed for lamina's
    CPU kernels), not rotary caches."""
    import torch
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            continue
        tensors = list(module.named_parameters(recurse=False)) + [
            (n, b) for n, b in module.named_buffers(recurse=False) if n in ("weight", "scale", "bias", "minimum", "packed")]
        for _, t in tensors:
            if t is None or t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def weight_bytes_gguf(path: str) -> int:
    """Bytes of tensor data of a GGUF file that a decode step reads (token_embd counts when it is
    also the output matrix, i.e. when there is no output.weight)."""
    from gguf import GGUFReader
    reader = GGUFReader(path)
    names = {t.name for t in reader.tensors}
    total = 0
    for t in reader.tensors:
        if t.name == "token_embd.weight" and "output.weight" in names:
            continue
        total += int(t.n_bytes)
    return total


def fmt(x, digits: int = 1) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if abs(x) >= 100:
            return f"{x:,.0f}"
        return f"{x:.{digits}f}"
    return str(x)
