"""Where each engine step's time goes.

    --profile-steps          a report at exit: time per phase, and for each kind of step (prefill,
                             mixed, decode) the bytes it read (weights plus KV) and the operations it
                             did, as GB/s and GFLOP/s beside this machine's measured peaks
    --trace-dir DIR          a Chrome / Perfetto trace (open it at ui.perfetto.dev): one span per step
                             with its phases (schedule, prepare, forward, sample, detokenize, stream)
                             nested inside, and as the step's arguments how many prefill and decode
                             tokens and sequences it ran
    --profile-torch-steps N  torch's profiler over the first N steps that run the model, its op-level
                             trace written to DIR too

`StepProfiler` does all three from one set of timestamps; disabled, every call is a cheap no-op.
"""
from __future__ import annotations

import atexit
import itertools
import json
import os
import threading
import time
from collections import defaultdict
from dataclasses import dataclass

import torch

STEP_KINDS = ("prefill", "mixed", "decode")


@dataclass(frozen=True)
class StepCosts:
    """What a step reads and computes, per token and per step, for the roofline figures."""
    weight_bytes: int              # read once by every step (the embedding table excepted: only its rows)
    kv_bytes_per_token: int        # K and V of one token, all layers
    flops_per_token: int           # 2 x the matmul weights one token goes through (the lm_head apart)
    lm_head_flops: int             # per sampled row
    attention_flops: int           # per (query token, attended key): 4 x layers x heads x head_dim

    @classmethod
    def of(cls, model: torch.nn.Module, kv_dtype: torch.dtype) -> StepCosts:
        cfg = model.config
        seen, weight_bytes, matmul, head = set(), 0, 0, 0
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Embedding):
                continue
            tensors = dict(module.named_parameters(recurse=False))
            tensors.update(module.named_buffers(recurse=False))
            if "packed" in tensors:         # a layer holding two layouts of one weight reads one per step
                tensors.pop("weight", None)
            for t in tensors.values():
                if t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    weight_bytes += t.numel() * t.element_size()
            in_f, out_f = getattr(module, "in_features", None), getattr(module, "out_features", None)
            if in_f and out_f and not any(True for _ in module.children()):
                out_f *= 2 if type(module).__name__ == "Bf16SwiGLU" else 1     # gate and up
                if name == "lm_head":
                    head = 2 * in_f * out_f
                else:
                    matmul += 2 * in_f * out_f
        elem = torch.empty((), dtype=kv_dtype).element_size()
        kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * elem
        attention = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim
        return cls(weight_bytes, kv, matmul, head, attention)


@dataclass
class StepShape:
    """One step's work, from its schedule."""
    prefill_tokens: int
    decode_tokens: int
    num_seqs: int
    sampled_rows: int
    context_tokens: int            # tokens in the KV cache after the step, summed over sequences
    attended_pairs: int            # (query token, key) pairs attention computes
    drafted_tokens: int = 0        # speculative decoding: draft tokens verified (in decode_tokens)

    @property
    def kind(self) -> str:
        return "mixed" if self.prefill_tokens and self.decode_tokens else "prefill" if self.prefill_tokens else "decode"


_trace_ids = itertools.count()


def _trace_path(trace_dir: str, kind: str) -> str:
    """A new file's name: the time, the process and a count, so engines of one process never share one."""
    return os.path.join(trace_dir, f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{next(_trace_ids)}.json")


class ChromeTrace:
    """Chrome's trace event format, as a JSON array written as it grows (each step flushed, so a
    killed process leaves a trace Perfetto still opens); close() makes it strict JSON."""

    def __init__(self, path: str):
        self.path = path
        self._file = open(path, "x")
        self._file.write("[\n")
        self._first = True
        self._origin = time.perf_counter()
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def span(self, name: str, start: float, seconds: float, tid: int = 1, args: dict | None = None) -> None:
        """A complete event ("X") from perf_counter time `start`, lasting `seconds`."""
        event = {"name": name, "ph": "X", "ts": round((start - self._origin) * 1e6, 1),
                 "dur": round(seconds * 1e6, 1), "pid": self._pid, "tid": tid, "cat": "lamina"}
        if args:
            event["args"] = args
        with self._lock:
            if self._file.closed:
                return
            self._file.write(("" if self._first else ",\n") + json.dumps(event))
            self._first = False

    def flush(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.write("\n]\n")
                self._file.close()


class StepProfiler:
    def __init__(self, enabled: bool = False, trace_dir: str | None = None, torch_steps: int = 0,
                 costs: StepCosts | None = None):
        self.report_enabled = enabled
        self.enabled = enabled or trace_dir is not None
        self.costs = costs
        self.totals: dict[str, float] = defaultdict(float)
        self.steps = 0
        # per kind of step: [steps, seconds in forward, tokens, bytes read, flops]
        self.kinds: dict[str, list[float]] = {k: [0, 0.0, 0, 0, 0] for k in STEP_KINDS}
        self.trace: ChromeTrace | None = None
        self.trace_dir = trace_dir
        self._torch_steps_left = torch_steps if trace_dir else 0
        self._torch_profile = None
        self._finish_lock = threading.Lock()
        self._t = self._step_start = 0.0
        self._shape: StepShape | None = None
        self._forward = 0.0
        if trace_dir:
            os.makedirs(trace_dir, exist_ok=True)
            self.trace = ChromeTrace(_trace_path(trace_dir, "lamina-steps"))
            atexit.register(self.close)    # a library user need not close the engine for a strict JSON file

    def start(self) -> None:
        if self.enabled:
            self._t = self._step_start = time.perf_counter()
            self._shape, self._forward = None, 0.0

    def describe(self, shape: StepShape) -> None:
        """What this step runs (after scheduling); starts torch's profiler on the first steps."""
        if not self.enabled:
            return
        self._shape = shape
        if self._torch_steps_left and self._torch_profile is None and shape.num_seqs:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._torch_profile = torch.profiler.profile(activities=activities, record_shapes=True)
            started = time.perf_counter()
            self._torch_profile.__enter__()
            # a second or so, once: a span of its own, not the next phase's time
            self._t = time.perf_counter()
            if self.trace is not None:
                self.trace.span("start torch profiler", started, self._t - started)

    def mark(self, phase: str) -> None:
        if self.enabled:
            now = time.perf_counter()
            self.totals[phase] += now - self._t
            if phase == "forward":
                self._forward = now - self._t
            if self.trace is not None:
                self.trace.span(phase, self._t, now - self._t)
            self._t = now

    def stop(self, accepted_tokens: int = 0) -> None:
        if not self.enabled:
            return
        self.mark("other")
        self.steps += 1
        shape = self._shape
        if shape is None or not shape.num_seqs:
            return
        tokens = shape.prefill_tokens + shape.decode_tokens
        stats = self.kinds[shape.kind]
        stats[0] += 1
        stats[1] += self._forward
        stats[2] += tokens
        if self.costs is not None:
            c = self.costs
            stats[3] += c.weight_bytes + shape.context_tokens * c.kv_bytes_per_token
            stats[4] += (tokens * c.flops_per_token + shape.sampled_rows * c.lm_head_flops
                         + shape.attended_pairs * c.attention_flops)
        if self.trace is not None:
            self.trace.span(f"step ({shape.kind})", self._step_start, time.perf_counter() - self._step_start, args={
                "prefill_tokens": shape.prefill_tokens, "decode_tokens": shape.decode_tokens,
                "num_seqs": shape.num_seqs, "context_tokens": shape.context_tokens,
                "drafted_tokens": shape.drafted_tokens, "accepted_tokens": accepted_tokens})
            self.trace.flush()
        if self._torch_profile is not None:
            self._torch_steps_left -= 1
            if self._torch_steps_left == 0:
                self._finish_torch_profile()

    def add(self, phase: str, seconds: float) -> None:
        """Time spent outside step() (the async engine's hand-off to streams), just now."""
        if self.enabled:
            self.totals[phase] += seconds
            if self.trace is not None:
                self.trace.span(phase, time.perf_counter() - seconds, seconds)

    def _finish_torch_profile(self) -> None:
        with self._finish_lock:     # the step thread and a shutdown may both get here
            profile, self._torch_profile = self._torch_profile, None
        if profile is not None:
            profile.__exit__(None, None, None)
            profile.export_chrome_trace(_trace_path(self.trace_dir, "torch-steps"))

    def close(self) -> None:
        """End the traces (torch's too, if fewer steps ran than it was to cover)."""
        if self._torch_profile is not None:
            self._finish_torch_profile()
        if self.trace is not None:
            self.trace.close()

    def report(self, peaks: dict | None = None) -> str:
        """The phase table, then each kind of step's roofline figures; `peaks` (roofline.measure_peaks)
        puts them beside what this machine reaches."""
        if not self.steps:
            return "no steps profiled"
        total = sum(self.totals.values())
        lines = [f"{self.steps} steps, {1e3 * total / self.steps:.3f} ms per step"]
        for phase, t in sorted(self.totals.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {phase:<12} {1e3 * t / self.steps:8.3f} ms/step  {100 * t / total:5.1f}%")
        if self.costs is not None and any(s[0] for s in self.kinds.values()):
            if peaks:
                lines.append(f"forward, by kind of step (this machine: read {peaks['read_gbps']:.1f} GB/s, "
                             f"bf16 matmul {peaks['matmul_bf16_gflops']:.0f} GFLOP/s)")
            else:
                lines.append("forward, by kind of step")
            for kind, (steps, seconds, tokens, nbytes, flops) in self.kinds.items():
                if steps and seconds > 0:
                    gbs, gflops = nbytes / seconds / 1e9, flops / seconds / 1e9
                    share = (f" ({gbs / peaks['read_gbps']:.0%} of read, {gflops / peaks['matmul_bf16_gflops']:.0%} "
                             f"of bf16 matmul)") if peaks else ""
                    lines.append(f"  {kind:<8} {int(steps):6d} steps {1e3 * seconds / steps:8.2f} ms  "
                                 f"{tokens / seconds:9.1f} tok/s  {gbs:7.3g} GB/s  {gflops:7.3g} GFLOP/s{share}")
        return "\n".join(lines)


def measure_peaks(n: int = 2048, rounds: int = 5, read_mib: int = 512) -> dict[str, float]:
    """This machine's ceilings as torch reaches them: the bf16, fp32 and int8 matmul rates of an
    n-cube (oneDNN: on AMX where granted) and the memory read bandwidth (summing read_mib MiB; 0
    skips it); the best of `rounds` each."""
    def best(fn, work: float) -> float:
        fn()
        fastest = float("inf")
        for _ in range(rounds):
            start = time.perf_counter()
            fn()
            fastest = min(fastest, time.perf_counter() - start)
        return work / fastest / 1e9
    peaks = {}
    for dtype, name in ((torch.bfloat16, "matmul_bf16_gflops"), (torch.float32, "matmul_fp32_gflops")):
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        peaks[name] = best(lambda: torch.mm(a, b), 2 * n ** 3)
    a8 = torch.randint(-64, 64, (n, n), dtype=torch.int8)
    try:
        peaks["matmul_int8_gops"] = best(lambda: torch._int_mm(a8, a8), 2 * n ** 3)
    except (RuntimeError, AttributeError):
        pass   # no CPU int8 matmul in this torch
    if read_mib:
        big = torch.ones(read_mib << 18)     # float32
        peaks["read_gbps"] = best(lambda: big.sum(), big.numel() * 4)
    return peaks
