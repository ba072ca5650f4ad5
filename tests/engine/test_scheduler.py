"""The scheduler's queues: removal by identity, in constant time."""
from __future__ import annotations

import time

from lamina.engine.kv_cache import BlockManager
from lamina.engine.scheduler import Scheduler
from lamina.engine.sequence import Sequence, SequenceStatus
from lamina.sampling_params import SamplingParams


def _seq(i, n=3):
    return Sequence(f"r{i}", 0, [1] * n, SamplingParams(), detokenizer=None, metrics=None)


def test_remove_from_waiting_and_running():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=64)
    seqs = [_seq(i) for i in range(4)]
    for s in seqs:
        sched.add(s)
    batch = sched.schedule()
    assert [s.request_id for s in batch.seqs] == ["r0", "r1"]
    assert list(sched.running) == seqs[:2] and list(sched.waiting) == seqs[2:]
    sched.remove(seqs[0])          # running
    sched.remove(seqs[3])          # waiting
    assert list(sched.running) == [seqs[1]] and list(sched.waiting) == [seqs[2]]
    assert len(sched.running) == 1 and len(sched.waiting) == 1 and sched.waiting.first() is seqs[2]
    sched.remove(seqs[3])          # twice: harmless
    sched.blocks.check_invariants()
    batch = sched.schedule()
    assert seqs[2] in batch.seqs and seqs[2].status == SequenceStatus.RUNNING


def test_remove_is_not_a_linear_scan():
    sched = Scheduler(BlockManager(8, 4), max_num_seqs=4, max_num_batched_tokens=64)
    seqs = [_seq(i) for i in range(20_000)]
    for s in seqs:
        sched.add(s)
    t0 = time.perf_counter()
    for s in reversed(seqs):       # the last of a deque or list is the far end of a scan
        sched.remove(s)
    elapsed = time.perf_counter() - t0
    assert not sched.waiting
    assert elapsed < 1.0, f"removing 20k waiting sequences took {elapsed:.2f}s"
