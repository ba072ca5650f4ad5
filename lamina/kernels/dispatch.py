"""Measured dispatch: which implementation serves each op and shape class, on this machine.

A kernel that wins on one CPU can lose on the next (torch's bf16 matmul runs on AMX through oneDNN
where the OS grants it; lamina's GEMMs use AVX-512), so the choice is made by measuring, not by
the CPU's name. The ops and their implementations:

    bf16_linear   lamina (packed C++ GEMM), torch (nn.functional.linear: oneDNN)
    bf16_swiglu   lamina (the packed GEMM applying SwiGLU), torch (linear, then SwiGLU)
    int8_linear   lamina (packed VNNI kernel), torch (torch's int8 GEMV), dequant (bf16 weight, torch's matmul)
    int4_linear   lamina (packed kernel), dequant
    attention     lamina (C++ paged attention), torch (the reference: gathered blocks, torch's SDPA)

GEMMs are told apart by their rows: decode (up to 16), batch (up to 256) and prefill (more);
attention by decode and prefill steps. On the first start with a model's shapes (`plan_for`), every
implementation of each op is timed at one row count of each class, in interleaved rounds on several
copies of the weight (so a decode step's weights come from memory, as they do when serving). Each
class keeps lamina's kernel unless another is faster by MARGIN: closer results are noise. Timings are
cached in $LAMINA_HOME/kernels/dispatch-<key>.json, keyed by the CPU (model and flags), whether
AMX is granted, the thread count, and the versions of torch, lamina and the C++ kernels; a later
start with the same key measures only shapes it has not seen. Timings taken while other processes
kept more than BUSY_FRACTION of the CPUs busy serve that run only and are not cached.

    LAMINA_DISPATCH   op=impl or op.class=impl, comma-separated (bf16_linear.prefill=torch,attention=torch)
    LAMINA_AUTOTUNE   0: measure nothing, take lamina's kernels where they load (the defaults below)

In batch-invariant mode nothing is measured: every op runs the one implementation in
BATCH_INVARIANT at every row count (`batch_invariant_plan`), and an override naming another is an
error.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from lamina import envs

log = logging.getLogger("lamina.kernels")

ROW_CLASSES = ("decode", "batch", "prefill")
DECODE_MAX_ROWS, BATCH_MAX_ROWS = 16, 256
TUNE_ROWS = {"decode": 1, "batch": 64, "prefill": 512}
ATTENTION_CLASSES = ("decode", "prefill")
IMPLS = {"bf16_linear": ("lamina", "torch"), "bf16_swiglu": ("lamina", "torch"),
         "int8_linear": ("lamina", "torch", "dequant"), "int4_linear": ("lamina", "dequant"),
         "attention": ("lamina", "torch")}
# What serves each class without a measurement, among the implementations available
DEFAULTS = {"int8_linear": {"prefill": "dequant"}, "int4_linear": {"prefill": "dequant"}}
# Without lamina's kernel: torch's int8 GEMV for decode rows, dequantize + matmul above
FALLBACKS = {"bf16_linear": "torch", "bf16_swiglu": "torch", "int8_linear": "dequant", "int4_linear": "dequant",
             "attention": "torch"}
# The implementation of each op whose arithmetic for one row never depends on the other rows of the
# call: lamina's GEMMs accumulate each output over all of K in order, in one register lane, whatever
# the tile of rows it sits in; its attention (the prefill kernel, decode rows included) reduces
# over fixed chunks of keys from the first. torch's matmul (oneDNN) chooses its blocking, and so
# its order of sums, by the shape; its attention splits by query length: neither is one of them.
BATCH_INVARIANT = {"bf16_linear": "lamina", "bf16_swiglu": "lamina", "int8_linear": "lamina",
                   "int4_linear": "lamina", "attention": "lamina"}
MARGIN = 0.05
# Timings taken while other processes used more of the CPUs than this are not cached
BUSY_FRACTION = 0.15
ROUNDS = 5
CLEARLY_SLOWER = 2.0
# Decode-sized timings cycle through copies of the weight totalling this many bytes, beyond the caches
STREAM_BYTES = 64 << 20


@dataclass(frozen=True)
class RowPlan:
    """The implementation of one op for each class of row counts."""
    decode: str
    batch: str
    prefill: str

    def pick(self, rows: int) -> str:
        # compare rows only at a boundary where the choice changes: under torch.compile each
        # comparison is a guard, and row_boundaries() must name every one of them
        if self.decode != self.batch and rows <= DECODE_MAX_ROWS:
            return self.decode
        if self.batch != self.prefill and rows > BATCH_MAX_ROWS:
            return self.prefill
        return self.batch

    def uses(self, impl: str) -> bool:
        return impl in (self.decode, self.batch, self.prefill)

    def __str__(self) -> str:
        if self.decode == self.batch == self.prefill:
            return self.decode
        return f"decode {self.decode}, batch {self.batch}, prefill {self.prefill}"


@dataclass(frozen=True)
class AttentionPlan:
    decode: str = "lamina"
    prefill: str = "lamina"

    def __str__(self) -> str:
        return self.decode if self.decode == self.prefill else f"decode {self.decode}, prefill {self.prefill}"


@dataclass(frozen=True)
class KernelPlan:
    """Every choice of one engine: per linear op and shape (N x K), and for attention."""
    linears: tuple[tuple[tuple[str, int, int], RowPlan], ...] = ()
    attention: AttentionPlan = AttentionPlan()
    source: str = "defaults"          # measured | cached | defaults, and why
    overrides: tuple[str, ...] = field(default=())
    batch_invariant: bool = False     # every op at every row count by BATCH_INVARIANT's implementation

    def linear(self, op: str, n: int, k: int, available: tuple[str, ...]) -> RowPlan:
        """The plan for one layer; a shape not planned (a layer added after) takes the defaults."""
        for key, plan in self.linears:
            if key == (op, n, k):
                return plan
        if self.batch_invariant:
            return batch_invariant_plan(op, available, self.overrides)
        return apply_overrides(op, default_plan(op, available), self.overrides)

    def row_boundaries(self) -> tuple[int, ...]:
        """The row counts after which some layer switches implementation: a compiled graph holds one
        implementation per layer, so each range between them needs a graph of its own."""
        bounds = set()
        for _, plan in self.linears:
            if plan.decode != plan.batch:
                bounds.add(DECODE_MAX_ROWS)
            if plan.batch != plan.prefill:
                bounds.add(BATCH_MAX_ROWS)
        return tuple(sorted(bounds))

    def summary(self) -> str:
        """e.g. `bf16_linear lamina; attention lamina (cached)`: one line, each op once."""
        by_op: dict[str, list[str]] = {}
        for (op, _, _), plan in self.linears:
            if str(plan) not in by_op.setdefault(op, []):
                by_op[op].append(str(plan))
        parts = [f"{op} {' | '.join(plans)}" for op, plans in by_op.items()]
        parts.append(f"attention {self.attention}")
        return f"{'; '.join(parts)} ({self.source})"


def default_plan(op: str, available: tuple[str, ...]) -> RowPlan:
    def choose(cls: str) -> str:
        want = DEFAULTS.get(op, {}).get(cls, "lamina")
        if want in available:
            return want
        if op == "int8_linear" and cls == "decode" and "torch" in available:
            return "torch"
        return FALLBACKS[op] if FALLBACKS[op] in available else available[0]
    return RowPlan(*(choose(c) for c in ROW_CLASSES))


def batch_invariant_plan(op: str, available: tuple[str, ...], overrides: tuple[str, ...] = (), what: str = ""):
    """BATCH_INVARIANT's implementation of `op` at every row count (a RowPlan; an AttentionPlan for
    attention). Raises ValueError where it cannot serve (`what`: the shape, for the message), or
    where $LAMINA_DISPATCH asks for another."""
    impl = BATCH_INVARIANT[op]
    if impl not in available:
        raise ValueError(f"batch-invariant mode runs {what or op} with {impl}'s kernel, which cannot serve it here "
                         f"(only {', '.join(available)} can)")
    plan = AttentionPlan(impl, impl) if op == "attention" else RowPlan(impl, impl, impl)
    forced = apply_overrides(op, plan, overrides)
    if forced != plan:
        raise ValueError(f"LAMINA_DISPATCH asks for {op} {forced}, but batch-invariant mode needs {impl} at every "
                         f"size (the others' sums depend on the batch); drop the override or the mode")
    return plan


def choose(timings: dict[str, float], default: str) -> str:
    """The fastest implementation, unless the default is within MARGIN of it."""
    best = min(timings, key=timings.get)
    if default in timings and timings[default] <= timings[best] * (1 + MARGIN):
        return default
    return best


# -- overrides -------------------------------------------------------------------------------------

def parse_overrides(text: str | None) -> tuple[str, ...]:
    """$LAMINA_DISPATCH as `op[.class]=impl` entries, checked; raises ValueError naming a bad one."""
    entries = tuple(e.strip() for e in (text or "").split(",") if e.strip())
    for entry in entries:
        target, _, impl = entry.partition("=")
        op, _, cls = target.strip().partition(".")
        classes = ATTENTION_CLASSES if op == "attention" else ROW_CLASSES
        if op not in IMPLS or (cls and cls not in classes) or impl.strip() not in IMPLS.get(op, ()):
            raise ValueError(f"LAMINA_DISPATCH: cannot read {entry!r}; write op=impl or op.class=impl with op in "
                             f"{', '.join(IMPLS)}, class in {', '.join(ROW_CLASSES)}, and impl one of that op's "
                             f"({_impl_list()})")
    return entries


def _impl_list() -> str:
    return "; ".join(f"{op}: {'|'.join(impls)}" for op, impls in IMPLS.items())


def apply_overrides(op: str, plan, overrides: tuple[str, ...]):
    """`plan` (a RowPlan or AttentionPlan) with the entries for `op` applied."""
    values = dict(vars(plan))
    for entry in overrides:
        target, _, impl = entry.partition("=")
        name, _, cls = target.strip().partition(".")
        if name == op:
            for c in ([cls] if cls else list(values)):
                values[c] = impl.strip()
    return type(plan)(**values)


# -- timing ----------------------------------------------------------------------------------------

def time_impls(impls: dict[str, list[Callable[[], object]]], rounds: int = ROUNDS) -> dict[str, float]:
    """Seconds per call of each implementation: each is a list of calls (one per weight copy), run
    through once to warm up, then `rounds` times, the implementations interleaved within each round
    (these machines drift within seconds); the median round of each. One that takes over
    CLEARLY_SLOWER times the fastest's first round is not timed again: it cannot win."""
    for calls in impls.values():
        for call in calls:
            call()
    samples: dict[str, list[float]] = {name: [] for name in impls}
    names = list(impls)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            started = time.perf_counter()
            for call in impls[name]:
                call()
            samples[name].append((time.perf_counter() - started) / len(impls[name]))
        if r == 0:
            best = min(s[0] for s in samples.values())
            names = [name for name in names if samples[name][0] <= best * CLEARLY_SLOWER]
    return {name: statistics.median(s) for name, s in samples.items()}


def copies_for(weight_bytes: int, rows: int) -> int:
    """How many weight copies a timing cycles through: enough to stream decode-sized steps' weights
    from memory; two for compute-bound row counts."""
    if weight_bytes >= STREAM_BYTES:    # one copy is beyond the caches already (and large models' are big)
        return 1
    if rows > DECODE_MAX_ROWS:
        return 2
    return max(2, min(32, STREAM_BYTES // max(weight_bytes, 1)))


# -- the cache -------------------------------------------------------------------------------------

def cache_facts() -> dict[str, str]:
    """What the timings depend on; a change in any of them makes a new cache file."""
    from lamina import __version__
    from lamina.kernels import cpu_build
    from lamina.cpu_features import amx, cpu_id
    library = cpu_build.library() if cpu_build.load() else None
    return {"cpu": hashlib.sha256(cpu_id().encode()).hexdigest()[:16], "amx": str(amx().granted),
            "threads": str(torch.get_num_threads()), "torch": torch.__version__, "lamina": __version__,
            "kernels": library.parent.name if library else "none"}


def cache_path(facts: dict[str, str] | None = None) -> Path:
    facts = facts or cache_facts()
    key = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]
    return Path(envs.lamina_home()) / "kernels" / f"dispatch-{key}.json"


def read_cache(path: Path) -> dict[str, dict[str, dict[str, float]]]:
    """entry -> class -> impl -> seconds; {} when the file is missing or unreadable (measured anew)."""
    try:
        data = json.loads(path.read_text())
        entries = data["entries"]
        assert isinstance(entries, dict)
        return entries
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
        log.warning("ignoring the kernel dispatch cache %s (%s: %s); measuring again", path, type(e).__name__, e)
        return {}


def write_cache(path: Path, facts: dict[str, str], entries: dict) -> None:
    """Keep the timings for later starts; a cache that cannot be written only costs the next start
    its measurement."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"facts": facts, "entries": entries}, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as e:
        log.warning("could not keep the kernel timings in %s (%s); the next start measures again", path, e)
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass      # there is no folder to have left it in


def complete(entry, classes: tuple[str, ...], impls: tuple[str, ...]) -> bool:
    """Whether a cached entry has a positive time for every implementation in every class asked."""
    try:
        return all(set(entry[c]) == set(impls) and all(float(s) > 0 for s in entry[c].values()) for c in classes)
    except (KeyError, TypeError, ValueError, AttributeError):
        return False
