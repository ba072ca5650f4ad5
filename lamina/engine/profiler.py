"""--profile-steps: where each engine step's time goes, phase by phase."""
from __future__ import annotations

import time
from collections import defaultdict


class StepProfiler:
    """Accumulates wall time per phase (schedule, forward, sample, detokenize, stream, ...).
    Disabled, every call is a cheap no-op."""

    def __init__(self, enabled: bool = False):
        self.enabled = enabled
        self.totals: dict[str, float] = defaultdict(float)
        self.steps = 0
        self._t = 0.0

    def start(self) -> None:
        if self.enabled:
            self._t = time.perf_counter()

    def mark(self, phase: str) -> None:
        if self.enabled:
            now = time.perf_counter()
            self.totals[phase] += now - self._t
            self._t = now

    def stop(self) -> None:
        if self.enabled:
            self.mark("other")
            self.steps += 1

    def add(self, phase: str, seconds: float) -> None:
        """Time spent outside step() (the async engine's hand-off to streams)."""
        if self.enabled:
            self.totals[phase] += seconds

    def report(self) -> str:
        if not self.steps:
            return "no steps profiled"
        total = sum(self.totals.values())
        lines = [f"{self.steps} steps, {1e3 * total / self.steps:.3f} ms per step"]
        for phase, t in sorted(self.totals.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {phase:<12} {1e3 * t / self.steps:8.3f} ms/step  {100 * t / total:5.1f}%")
        return "\n".join(lines)
