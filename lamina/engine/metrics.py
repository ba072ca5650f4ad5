"""Counters, gauges and histograms the engine keeps; the server renders them for /metrics."""
from __future__ import annotations

import bisect
import logging
import threading
from dataclasses import dataclass, field

log = logging.getLogger("lamina.engine")

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   7.5, 10.0, 20.0, 40.0, 80.0, 160.0)


class Histogram:
    """Cumulative-bucket histogram in the Prometheus sense."""

    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # last slot: +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        out, total = [], 0
        for bound, c in zip(list(self.buckets) + [float("inf")], self.counts):
            total += c
            out.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return out


@dataclass
class StepStats:
    num_running: int = 0
    num_waiting: int = 0
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    num_preempted: int = 0


@dataclass
class EngineStats:
    # gauges, as of the last step
    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0      # referenced by a live sequence
    kv_blocks_cached: int = 0    # unreferenced but holding a reusable prefix
    kv_blocks_free: int = 0
    block_size: int = 16
    last_step: StepStats = field(default_factory=StepStats)
    # counters, since start
    num_steps: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    prefix_cache_queries_total: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits_total: int = 0     # ... of which found there
    num_preemptions_total: int = 0
    request_success_total: dict[str, int] = field(default_factory=dict)  # finish_reason -> count
    # speculative decoding: drafts verified, their tokens, the tokens kept, and kept per position
    spec_num_drafts_total: int = 0
    spec_num_draft_tokens_total: int = 0
    spec_num_accepted_tokens_total: int = 0
    spec_accepted_per_position: list[int] = field(default_factory=list)
    # histograms (seconds)
    time_to_first_token: Histogram = field(default_factory=Histogram)
    inter_token_latency: Histogram = field(default_factory=Histogram)
    e2e_request_latency: Histogram = field(default_factory=Histogram)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of blocks in use by live sequences (cached-but-idle blocks count as free)."""
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        q = self.prefix_cache_queries_total
        return self.prefix_cache_hits_total / q if q else 0.0

    def record_draft(self, drafted: int, accepted: int) -> None:
        """One sequence's draft of `drafted` tokens, of which the first `accepted` were kept."""
        with self.lock:
            self.spec_num_drafts_total += 1
            self.spec_num_draft_tokens_total += drafted
            self.spec_num_accepted_tokens_total += accepted
            if len(self.spec_accepted_per_position) < drafted:
                self.spec_accepted_per_position += [0] * (drafted - len(self.spec_accepted_per_position))
            for i in range(accepted):
                self.spec_accepted_per_position[i] += 1

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens a verification step yields on average: the accepted drafts plus the model's own."""
        n = self.spec_num_drafts_total
        return 1 + self.spec_num_accepted_tokens_total / n if n else 0.0

    def log_line(self) -> str:
        s = self.last_step
        spec = (f", speculative: mean acceptance length {self.mean_acceptance_length:.2f}, drafted/accepted "
                f"{self.spec_num_draft_tokens_total}/{self.spec_num_accepted_tokens_total}"
                if self.spec_num_drafts_total else "")
        return (f"running {self.num_running}, waiting {self.num_waiting}, "
                f"step prefill/decode tokens {s.num_prefill_tokens}/{s.num_decode_tokens}, "
                f"KV blocks used/cached/free {self.kv_blocks_used}/{self.kv_blocks_cached}/{self.kv_blocks_free} "
                f"({100 * self.kv_cache_usage:.1f}% used), prefix-cache hit rate "
                f"{100 * self.prefix_cache_hit_rate:.1f}%, preemptions {self.num_preemptions_total}, "
                f"tokens in/out {self.prompt_tokens_total}/{self.generation_tokens_total}{spec}")
