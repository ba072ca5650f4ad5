"""The llama.cpp peer: `llama-bench` for single-stream numbers, `llama-server` for offline throughput
and the serving sweep. Binaries come from bench/build_llamacpp.sh (bench/peers/bin/) or $PATH."""
from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import urllib.request

from common import OUT_DIR, free_port, launch, llama_bin, log, median, stop, wait_health


def run_llama_bench(gguf: str, threads: int, prompt_lens: list[int], gen: int, reps: int) -> dict:
    """`llama-bench -m GGUF -t THREADS -p P1,P2 -n GEN -r REPS -o json`: prompt processing (ppP) and
    text generation (tgGEN, from an empty context) in tokens/s, the median of the repetitions."""
    exe = llama_bin("llama-bench")
    cmd = [exe, "-m", gguf, "-t", str(threads), "-p", ",".join(map(str, prompt_lens)), "-n", str(gen),
           "-r", str(reps), "-o", "json"]
    log("running " + " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": f"llama-bench exited {proc.returncode}: {proc.stderr[-2000:]}", "command": cmd}
    rows = json.loads(proc.stdout)
    res: dict = {"command": " ".join(cmd), "tests": {}}
    for row in rows:
        key = f"pp{row['n_prompt']}" if row.get("n_gen", 0) == 0 else f"tg{row['n_gen']}"
        samples = row.get("samples_ts") or [row.get("avg_ts")]
        res["tests"][key] = {"median_ts": median(samples), "samples_ts": samples}
        res.setdefault("build_commit", row.get("build_commit"))
        res.setdefault("build_number", row.get("build_number"))
        res.setdefault("cpu_info", row.get("cpu_info"))
        res.setdefault("model_type", row.get("model_type"))
        res.setdefault("model_size", row.get("model_size"))
        res.setdefault("n_threads", row.get("n_threads"))
    return res


class LlamaServer:
    """`llama-server -m GGUF --parallel N -t THREADS -c CTX --port P` on 127.0.0.1, for a `with` block."""

    def __init__(self, gguf: str, parallel: int, threads: int, ctx: int, port: int | None = None,
                 log_name: str = "llama-server.log"):
        self.port = port or free_port()
        self.cmd = [llama_bin("llama-server"), "-m", gguf, "--parallel", str(parallel), "-t", str(threads),
                    "-tb", str(threads), "-c", str(ctx), "--host", "127.0.0.1", "--port", str(self.port),
                    "--no-webui"]
        self.log_path = os.path.join(OUT_DIR, log_name)
        self.proc: subprocess.Popen | None = None

    @property
    def command(self) -> str:
        return " ".join(self.cmd)

    def __enter__(self):
        log("starting " + self.command)
        self.proc = launch(self.cmd, self.log_path)
        if not wait_health(self.port, self.proc, timeout=120):
            self.__exit__(None, None, None)
            raise RuntimeError(f"llama-server did not become ready; see {self.log_path}")
        return self

    def __exit__(self, *exc):
        if self.proc:
            stop(self.proc, timeout=20)


def completion(port: int, prompt: list[int], max_tokens: int, timeout: float = 1800) -> dict:
    body = json.dumps({"prompt": prompt, "n_predict": max_tokens, "temperature": 0, "top_k": 1,
                       "ignore_eos": True, "cache_prompt": False, "stream": False}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/completion", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def offline_via_server(port: int, prompts: list[list[int]], max_tokens: int, concurrency: int) -> dict:
    """Every prompt through llama-server's /completion, `concurrency` requests in flight (its slots)."""
    completion(port, prompts[0][:16], 4)  # warm-up
    todo = list(enumerate(prompts))
    lock = threading.Lock()
    results: dict[int, dict] = {}
    errors: list[str] = []

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                i, p = todo.pop(0)
            try:
                results[i] = completion(port, p, max_tokens)
            except Exception as e:  # noqa: BLE001 - reported, not raised
                errors.append(repr(e))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    out_tokens = sum(int(r.get("tokens_predicted", 0)) for r in results.values())
    prompt_tokens = sum(len(p) for p in prompts)
    res = {"elapsed_s": elapsed, "out_tokens": out_tokens, "prompt_tokens": prompt_tokens,
           "n_prompts": len(prompts), "output_tps": out_tokens / elapsed,
           "total_tps": (out_tokens + prompt_tokens) / elapsed, "concurrency": concurrency}
    if errors:
        res["errors"] = errors[:5]
        res["n_errors"] = len(errors)
    return res
