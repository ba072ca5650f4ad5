"""One system in one fresh process: what bench/run.py and bench/offline.py spawn.

    python bench/workers.py machine --out m.json                      # memory bandwidth, matmul peaks
    python bench/workers.py decode  --engine lamina --dtype bfloat16 --out d.json
    python bench/workers.py prefill --engine hf --dtype float32 --out p.json
    python bench/workers.py offline --engine lamina --prompts prompts.json --out o.json
    python bench/workers.py loop    --engine lamina ...   # load once, then tasks as JSON lines on stdin
                                                          # (common.Worker: the suite's interleaved rounds)

Engines: `lamina` (its library API: LLM / SamplingParams), `hf` (transformers
AutoModelForCausalLM, SDPA attention, greedy generate), `llamacpp-py` (the llama_cpp Python
bindings on the model's source GGUF). Every task uses prompt token ids from bench/common.py, so all
systems see the very same tokens, and writes one JSON object to --out.

Timing definitions (the same for every engine):
  TTFT        seconds from handing the prompt to the system until its first generated token exists
  decode tok/s  (generated tokens - 1) / (time of last token - time of first token)
  prefill tok/s prompt tokens / TTFT of a 1-token generation
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import (OthersMeter, batches_by_length, log, median, padded_tokens, protocol_stdout,  # noqa: E402
                    random_prompt, summarize, vocab_size, weight_bytes_gguf, weight_bytes_torch)

GIB = 1 << 30


# --------------------------------------------------------------------------------------------
# machine: the roofline's two numbers


def measure_machine(threads: int, quick: bool) -> dict:
    """Memory read bandwidth (a multi-threaded sum over a tensor far larger than the caches) and
    copy bandwidth, plus fp32 / bf16 matmul peaks, with torch on `threads` threads."""
    import numpy as np
    import torch
    torch.set_num_threads(threads)
    res: dict = {"threads": threads}

    n_bytes = (256 if quick else 1024) * (1 << 20)
    a = torch.ones(n_bytes // 4, dtype=torch.float32)
    reps = 3 if quick else 7
    t_best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        s = a.sum()
        t_best = min(t_best, time.perf_counter() - t0)
    assert float(s) == a.numel()
    res["read_gbps"] = n_bytes / t_best / 1e9
    res["read_method"] = f"torch.sum over a {n_bytes >> 20} MiB float32 tensor, best of {reps}"

    b = torch.empty_like(a)
    t_best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        b.copy_(a)
        t_best = min(t_best, time.perf_counter() - t0)
    res["copy_gbps"] = 2 * n_bytes / t_best / 1e9  # read + write
    res["copy_method"] = f"tensor.copy_ of {n_bytes >> 20} MiB (read+write bytes), best of {reps}"

    # numpy: one thread per chunk (its reductions release the GIL), and one thread alone
    from concurrent.futures import ThreadPoolExecutor
    x = np.ones(n_bytes // 8, dtype=np.float64)
    chunks = np.array_split(x, threads)
    with ThreadPoolExecutor(threads) as pool:
        for label, fn in (("read_gbps_numpy_threads", lambda: list(pool.map(np.sum, chunks))),
                          ("read_gbps_1thread_numpy", lambda: x.sum())):
            t_best = float("inf")
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                t_best = min(t_best, time.perf_counter() - t0)
            res[label] = n_bytes / t_best / 1e9
    res["read_gbps_torch_sum"] = res["read_gbps"]
    # the roofline's bandwidth: the best any of these reads achieved
    res["read_gbps"] = max(res["read_gbps_torch_sum"], res["read_gbps_numpy_threads"], res["read_gbps_1thread_numpy"])
    res["read_method"] = (f"best of: torch.sum ({threads} threads), numpy sum over {threads} chunks in {threads} "
                          f"threads, numpy sum on 1 thread; {n_bytes >> 20} MiB, best of {reps} each")
    del a, b

    from lamina.engine.profiler import measure_peaks
    n = 1024 if quick else 2048
    peaks = measure_peaks(n=n, rounds=3 if quick else 5, read_mib=0)   # the reads are measured above
    res.update({k: v for k, v in peaks.items() if k.startswith("matmul_")})
    res["matmul_method"] = (f"lamina.engine.profiler.measure_peaks: torch.mm (int8: torch._int_mm) of two "
                            f"{n}x{n} matrices, best of {3 if quick else 5}")
    from lamina.cpu_features import amx
    res["amx"] = f"{'granted' if amx().granted else 'no'}: {amx().reason}"
    res["torch"] = torch.__version__
    return res


# --------------------------------------------------------------------------------------------
# systems: a uniform face over lamina, transformers and llama-cpp-python


class System:
    name = "?"
    weight_bytes: int | None = None
    info: dict = {}

    def generate_timed(self, prompt: list[int], max_tokens: int) -> dict:
        """Greedy generation of exactly max_tokens tokens (EOS ignored). Returns
        {ttft_s, decode_tps, e2e_s, n_out, tokens}."""
        raise NotImplementedError

    def generate_batch(self, prompts: list[list[int]], max_tokens: int, batch_size: int) -> dict:
        """All prompts, max_tokens each; returns {elapsed_s, out_tokens, prompt_tokens}."""
        raise NotImplementedError


def _timing(t_start: float, token_times: list[float], n_out: int, t_end: float) -> dict:
    first = token_times[0] if token_times else None
    last = token_times[-1] if token_times else None
    return {
        "ttft_s": None if first is None else first - t_start,
        "decode_tps": (n_out - 1) / (last - first) if n_out > 1 and last > first else None,
        "e2e_s": t_end - t_start,
        "n_out": n_out,
    }


class Lamina(System):
    def __init__(self, model: str, dtype: str, quantization: str | None, eager: bool, threads: int,
                 kv_cache_memory: int, max_num_batched_tokens: int, max_num_seqs: int):
        from lamina import LLM, SamplingParams
        self.SamplingParams = SamplingParams
        t0 = time.time()
        # max_num_batched_tokens None: LLM's own default
        step_budget = {} if max_num_batched_tokens is None else {"max_num_batched_tokens": max_num_batched_tokens}
        self.llm = LLM(model, dtype=dtype, quantization=quantization, enforce_eager=True if eager else None,
                       num_threads=threads, kv_cache_memory=kv_cache_memory, max_num_seqs=max_num_seqs, **step_budget)
        runner = self.llm.engine.runner
        load_s = time.time() - t0
        compiled = wait_full_speed(runner)
        self.weight_bytes = weight_bytes_torch(runner.model)
        import torch
        self.info = {"load_s": round(load_s, 2), "full_speed_s": round(time.time() - t0, 2),
                     "dtype": str(runner.dtype).replace("torch.", ""),
                     "quantization": quantization, "compiled": compiled, "torch_threads": torch.get_num_threads(),
                     "kv_cache_memory": kv_cache_memory,
                     "max_num_batched_tokens": self.llm.engine.config.max_num_batched_tokens,
                     "max_num_seqs": max_num_seqs}

    def _params(self, max_tokens):
        return self.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)

    def generate_timed(self, prompt, max_tokens):
        out = self.llm.generate({"prompt_token_ids": prompt}, self._params(max_tokens))[0]
        m = out.metrics
        n = len(out.outputs[0].token_ids)
        res = {"ttft_s": m.first_token_time - m.arrival_time,
               "decode_tps": (n - 1) / (m.finished_time - m.first_token_time) if n > 1 else None,
               "e2e_s": m.finished_time - m.arrival_time, "n_out": n}
        res["tokens"] = list(out.outputs[0].token_ids)
        return res

    def generate_batch(self, prompts, max_tokens, batch_size):
        t0 = time.perf_counter()
        import inspect
        # no progress bar: it is for people watching, and the log stays readable
        quiet = {"use_tqdm": False} if "use_tqdm" in inspect.signature(self.llm.generate).parameters else {}
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], self._params(max_tokens), **quiet)
        elapsed = time.perf_counter() - t0
        ttfts = [o.metrics.first_token_time - o.metrics.arrival_time for o in outs]
        return {"elapsed_s": elapsed, "out_tokens": sum(len(o.outputs[0].token_ids) for o in outs),
                "prompt_tokens": sum(len(p) for p in prompts), "median_ttft_s": median(ttfts)}


def wait_full_speed(runner, timeout: float = 3600) -> str:
    """Block until lamina's compiled steps, if any, are built: a measurement must never run beside
    a background compile (it would steal the CPUs and measure eager steps). Returns what the runner
    runs: "compiled", "eager", or "compile failed". Reads `runner.compiled` (a CompiledSteps with
    wait() and status, the background compile) or, on older code, `runner.compiled_forward`."""
    steps = getattr(runner, "compiled", None)
    if steps is not None and hasattr(steps, "wait"):
        t0 = time.time()
        if steps.status == "compiling":
            log("waiting for lamina's background compile before measuring")
        ok = steps.wait(timeout)
        if time.time() - t0 > 1:
            log(f"compiled steps {steps.status} after {time.time() - t0:.0f}s")
        return "compiled" if ok else f"compile {steps.status}"
    return "compiled" if getattr(runner, "compiled_forward", None) is not None else "eager"


class HF(System):
    def __init__(self, model_dir: str, dtype: str, threads: int):
        import torch
        import transformers
        from transformers import AutoModelForCausalLM
        torch.set_num_threads(threads)
        self.torch = torch
        t0 = time.time()
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=getattr(torch, dtype), attn_implementation="sdpa").eval()
        self.weight_bytes = weight_bytes_torch(self.model)
        cfg = self.model.config
        self.pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id
        self.info = {"load_s": round(time.time() - t0, 2), "dtype": dtype, "attn_implementation": "sdpa",
                     "transformers": transformers.__version__, "torch": torch.__version__,
                     "torch_threads": torch.get_num_threads()}

    def _gen_kwargs(self, max_tokens):
        # min_new_tokens == max_new_tokens: EOS is masked out, exactly max_tokens tokens (ignore_eos)
        return dict(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                    pad_token_id=self.pad_id, temperature=None, top_p=None, top_k=None)

    def generate_timed(self, prompt, max_tokens):
        torch = self.torch
        times: list[float] = []

        class Clock:  # transformers' streamer protocol: put(prompt ids) once, then put(new token) per step
            calls = 0

            def put(self, value):
                Clock.calls += 1
                if Clock.calls > 1:
                    times.append(time.perf_counter())

            def end(self):
                pass

        ids = torch.tensor([prompt])
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=Clock(),
                                      **self._gen_kwargs(max_tokens))
        t1 = time.perf_counter()
        tokens = out[0, len(prompt):].tolist()
        res = _timing(t0, times, len(tokens), t1)
        res["tokens"] = tokens
        return res

    def generate_batch(self, prompts, max_tokens, batch_size, sort_by_length: bool = True):
        torch = self.torch
        total_out = 0
        batches = batches_by_length(prompts, batch_size, sort_by_length)
        t0 = time.perf_counter()
        for n, batch in enumerate(batches):
            chunk = [prompts[i] for i in batch]
            width = max(len(p) for p in chunk)
            # left padding: every row's last prompt token sits in the last column
            ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in chunk])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            with torch.inference_mode():
                out = self.model.generate(input_ids=ids, attention_mask=mask, **self._gen_kwargs(max_tokens))
            total_out += (out.shape[1] - width) * len(chunk)
            log(f"hf batch {n + 1}/{len(batches)} ({time.perf_counter() - t0:.1f}s)")
        elapsed = time.perf_counter() - t0
        real = sum(len(p) for p in prompts)
        return {"elapsed_s": elapsed, "out_tokens": total_out, "prompt_tokens": real,
                "sorted_by_length": sort_by_length, "padded_prompt_tokens": padded_tokens(prompts, batches),
                "pad_ratio": padded_tokens(prompts, batches) / real,
                "pad_ratio_unsorted": padded_tokens(prompts, batches_by_length(prompts, batch_size, False)) / real}


class LlamaCppPy(System):
    def __init__(self, gguf: str, threads: int, n_ctx: int):
        import llama_cpp
        t0 = time.time()
        self.llm = llama_cpp.Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                                   n_batch=512, verbose=False, seed=0)
        self.weight_bytes = weight_bytes_gguf(gguf)
        self.info = {"load_s": round(time.time() - t0, 2), "llama_cpp_python": llama_cpp.__version__,
                     "n_threads": threads, "n_ctx": n_ctx, "weights": "source.gguf (Q4_1)"}

    def generate_timed(self, prompt, max_tokens):
        self.llm.reset()
        times, tokens = [], []
        t0 = time.perf_counter()
        # generate() never stops on EOS by itself: exactly max_tokens greedy tokens
        for tok in self.llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                                     reset=True):
            times.append(time.perf_counter())
            tokens.append(int(tok))
            if len(tokens) >= max_tokens:
                break
        res = _timing(t0, times, len(tokens), time.perf_counter())
        res["tokens"] = tokens
        return res


def make_system(args) -> System:
    if args.engine == "lamina":
        return Lamina(args.model_dir, args.dtype, args.quantization, args.eager, args.threads,
                      args.kv_cache_memory, args.max_num_batched_tokens, args.max_num_seqs)
    if args.engine == "hf":
        return HF(args.model_dir, args.dtype, args.threads)
    if args.engine == "llamacpp-py":
        return LlamaCppPy(os.path.join(args.model_dir, "source.gguf"), args.threads, n_ctx=args.n_ctx)
    raise SystemExit(f"unknown engine {args.engine}")


# --------------------------------------------------------------------------------------------
# tasks


def task_latency(sys_: System, vocab: int, prompt_len: int, gen: int, seeds: list[int], warmup_seed: int,
                 warmup_tokens: int) -> dict:
    """Single stream: a warm-up generation, then one generation of `gen` tokens after a distinct
    `prompt_len`-token prompt per seed (the same seeds on every system; no two runs, rounds or
    sections share a prompt, so lamina's prefix cache never helps)."""
    sys_.generate_timed(random_prompt(vocab, prompt_len, seed=warmup_seed), warmup_tokens)
    runs_out = []
    for i, seed in enumerate(seeds):
        r = sys_.generate_timed(random_prompt(vocab, prompt_len, seed=seed), gen)
        tokens = r.pop("tokens", None)
        if i == 0 and tokens is not None:
            r["first_tokens"] = tokens[:16]
        if r.get("ttft_s"):
            r["prefill_tps"] = prompt_len / r["ttft_s"]
        r["seed"] = seed
        runs_out.append(r)
        log(f"{sys_.name} p{prompt_len}+g{gen} seed {seed}: ttft {r['ttft_s']:.3f}s"
            + (f", decode {r['decode_tps']:.1f} tok/s" if r.get("decode_tps") else ""))
    return summarize(runs_out, ["ttft_s", "decode_tps", "e2e_s", "prefill_tps"])


def task_offline(sys_: System, vocab: int, prompts: list[list[int]], max_tokens: int, serial: bool,
                 batch_size: int, sort_by_length: bool = True) -> dict:
    """Every prompt, max_tokens each: all at once (the system's batch API), or one at a time."""
    # warm-up on a short prompt outside the measured set
    sys_.generate_timed(random_prompt(vocab, 16, seed=424242 + len(prompts) + len(prompts[0])), 4)
    result: dict = {}
    if serial:
        t_total, out_total, per = 0.0, 0, []
        for i, p in enumerate(prompts):
            t0 = time.perf_counter()
            r = sys_.generate_timed(p, max_tokens)
            dt = time.perf_counter() - t0
            t_total += dt
            out_total += r["n_out"]
            per.append({"prompt_len": len(p), "elapsed_s": dt, "n_out": r["n_out"]})
            log(f"{sys_.name} serial {i + 1}/{len(prompts)}: {len(p)}-token prompt, {dt:.1f}s")
        result.update({"elapsed_s": t_total, "out_tokens": out_total,
                       "prompt_tokens": sum(len(p) for p in prompts), "per_prompt": per})
    elif isinstance(sys_, HF):
        result.update(sys_.generate_batch(prompts, max_tokens, batch_size, sort_by_length))
    else:
        result.update(sys_.generate_batch(prompts, max_tokens, batch_size))
    result["n_prompts"] = len(prompts)
    result["output_tps"] = result["out_tokens"] / result["elapsed_s"]
    result["total_tps"] = (result["out_tokens"] + result["prompt_tokens"]) / result["elapsed_s"]
    return result


def run_task(sys_: System, vocab: int, task: str, p: dict) -> dict:
    """One task on a loaded system; `p` holds its parameters (as the loop's JSON requests do)."""
    if task in ("decode", "latency"):
        return task_latency(sys_, vocab, p["prompt_len"], p.get("gen", 256), p["seeds"], p.get("warmup_seed", 0),
                            p.get("warmup_tokens", 8))
    if task == "prefill":
        return task_latency(sys_, vocab, p["prompt_len"], 1, p["seeds"], p.get("warmup_seed", 0), 1)
    if task == "offline":
        with open(p["prompts"]) as f:
            prompts = json.load(f)
        return task_offline(sys_, vocab, prompts, p["max_tokens"], p.get("serial", False), p.get("batch_size", 32),
                            p.get("sort_by_length", True))
    raise ValueError(f"unknown task {task!r}")


def loop(args) -> int:
    """Load the system once, say so on stdout, then run each JSON request read from stdin and answer
    it with one JSON line, until stdin ends or a request says {"task": "exit"}."""
    import traceback
    proto = protocol_stdout()
    try:
        sys_ = make_system(args)
    except Exception as e:  # noqa: BLE001 - reported to the orchestrator
        traceback.print_exc()
        proto.write(json.dumps({"error": f"loading failed: {e!r}"}) + "\n")
        return 1
    sys_.name = args.name or args.engine
    vocab = vocab_size(args.model_dir)
    proto.write(json.dumps({"engine": args.engine, "weight_bytes": sys_.weight_bytes, "info": sys_.info}) + "\n")
    for line in sys.stdin:
        req = json.loads(line)
        task = req.pop("task")
        if task == "exit":
            break
        try:
            with OthersMeter() as meter:
                out = run_task(sys_, vocab, task, req)
            out["others_cpu_during"] = meter.fraction
        except Exception as e:  # noqa: BLE001 - one failed task does not end the worker
            traceback.print_exc()
            out = {"error": f"{task} failed: {e!r}"}
        proto.write(json.dumps(out) + "\n")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task", choices=["machine", "decode", "prefill", "offline", "loop"])
    ap.add_argument("--out", help="where the one-shot tasks write their JSON (not loop)")
    ap.add_argument("--engine", choices=["lamina", "hf", "llamacpp-py"])
    ap.add_argument("--name", default=None, help="label of the system in logs")
    ap.add_argument("--model-dir")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--eager", action="store_true", help="lamina: no torch.compile (enforce_eager=True)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--kv-cache-memory", type=int, default=1 * GIB)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: LLM's")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--n-ctx", type=int, default=2048, help="llama-cpp-python context")
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prompts", help="offline: JSON file with a list of token-id lists")
    ap.add_argument("--max-tokens", type=int, default=64, help="offline: tokens per prompt")
    ap.add_argument("--batch-size", type=int, default=32, help="offline, hf: prompts per generate call")
    ap.add_argument("--serial", action="store_true", help="offline: one prompt at a time")
    ap.add_argument("--hf-unsorted", action="store_true",
                    help="offline, hf: batch the prompts in their order (default: sorted by length)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.task == "loop":
        return loop(args)
    if not args.out:
        ap.error("--out is required")

    if args.task == "machine":
        result = measure_machine(args.threads, args.quick)
    else:
        sys_ = make_system(args)
        sys_.name = args.name or args.engine
        vocab = vocab_size(args.model_dir)
        result = {"engine": args.engine, "weight_bytes": sys_.weight_bytes, "info": sys_.info}
        seeds = list(range(1, args.runs + 1))
        if args.task == "decode":
            result.update(run_task(sys_, vocab, "decode", {"prompt_len": args.prompt_len, "gen": args.gen,
                                                           "seeds": seeds}))
        elif args.task == "prefill":
            result.update(run_task(sys_, vocab, "prefill", {"prompt_len": args.prompt_len, "seeds": seeds}))
        elif args.task == "offline":
            result.update(run_task(sys_, vocab, "offline", {
                "prompts": args.prompts, "max_tokens": args.max_tokens, "serial": args.serial,
                "batch_size": args.batch_size, "sort_by_length": not args.hf_unsorted}))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
