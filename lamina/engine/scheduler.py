"""Which sequences run in the next step, and with how many new tokens each.

Decodes go first, one token each, so running streams never stall; prefill chunks (new prompts, or
the rest of a long one) fill what is left of the token budget. Admission is first come, first served.
When the cache runs out, the most recently admitted running sequence is preempted: its blocks are
freed and it is recomputed from its tokens later (its prefix may well still be cached by then).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from lamina.engine.kv_cache import BlockManager
from lamina.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    num_decode: int = 0                                          # of the tokens, how many are decodes
    num_draft: int = 0                                           # ... and how many are drafts to verify
    # newly admitted from the waiting queue, with how many tokens were looked up in the prefix cache
    admitted: list[tuple[Sequence, int]] = field(default_factory=list)
    num_preempted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.seqs)


class SeqQueue:
    """Sequences in order, with removal of any one by identity in O(1) (an ordered dict keyed by
    seq_id): aborts and finishes take a sequence out from anywhere, and a scan of a list or deque
    per removal made a long queue quadratic."""

    def __init__(self):
        self._seqs: OrderedDict[int, Sequence] = OrderedDict()

    def append(self, seq: Sequence) -> None:
        self._seqs[seq.seq_id] = seq

    def appendleft(self, seq: Sequence) -> None:
        self._seqs[seq.seq_id] = seq
        self._seqs.move_to_end(seq.seq_id, last=False)

    def extendleft_in_order(self, seqs: list[Sequence]) -> None:
        """Put seqs back at the front, keeping their order."""
        for seq in reversed(seqs):
            self.appendleft(seq)

    def popleft(self) -> Sequence:
        return self._seqs.popitem(last=False)[1]

    def discard(self, seq: Sequence) -> bool:
        """Take seq out if it is here; True if it was."""
        return self._seqs.pop(seq.seq_id, None) is not None

    def first(self) -> Sequence:
        return next(iter(self._seqs.values()))

    def last(self) -> Sequence:
        return next(reversed(self._seqs.values()))

    def __contains__(self, seq) -> bool:
        return self._seqs.get(getattr(seq, "seq_id", None)) is seq

    def __iter__(self):
        return iter(list(self._seqs.values()))   # a snapshot: callers may remove while iterating

    def __len__(self) -> int:
        return len(self._seqs)

    def __bool__(self) -> bool:
        return bool(self._seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting = SeqQueue()
        self.running = SeqQueue()   # in admission order: the last is preempted first

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out and return its blocks."""
        if not self.running.discard(seq):
            self.waiting.discard(seq)
        self.blocks.release(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.discard(seq)
        self.blocks.release(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_cached_tokens = 0
        seq.draft = []
        self.waiting.appendleft(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        scheduled: set[int] = set()

        # 1. running sequences, oldest first: decodes, then the next chunk of unfinished prefills
        for phase in ("decode", "prefill"):
            for seq in self.running:
                if seq.seq_id in scheduled or seq.status != SequenceStatus.RUNNING:
                    continue
                if (phase == "decode") == seq.in_prefill:
                    continue
                num_new = min(len(seq) - seq.num_computed_tokens, budget)
                if num_new <= 0:
                    continue
                if seq.draft:   # a draft rides along only where budget and free blocks allow it whole
                    k = len(seq.draft)
                    if num_new + k > budget or not self.blocks.can_grow(seq, num_new + k):
                        seq.draft = []
                    num_new += len(seq.draft)
                while not self.blocks.can_grow(seq, num_new):
                    victim = self.running.last()
                    if victim.seq_id in scheduled:  # never undo work already in this batch
                        victim = seq
                    self._preempt(victim)
                    batch.num_preempted += 1
                    if victim is seq:
                        break
                if seq.status != SequenceStatus.RUNNING:
                    continue
                self.blocks.grow(seq, num_new)
                batch.seqs.append(seq)
                batch.num_new_tokens.append(num_new)
                scheduled.add(seq.seq_id)
                batch.num_decode += phase == "decode"
                batch.num_draft += len(seq.draft)
                budget -= num_new

        # 2. waiting sequences, first come first served, while budget and cache allow
        skipped: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting.first()
            if seq.awaiting_grammar is not None or (seq.wait_for is not None and not self._sibling_ready(seq)):
                skipped.append(self.waiting.popleft())   # let later requests by meanwhile
                continue
            hits = self.blocks.match_prefix(seq)
            num_new = min(len(seq) - len(hits) * self.blocks.block_size, budget)
            if self.blocks.blocks_to_admit(seq, num_new, hits) > self.blocks.num_free_blocks:
                break
            self.waiting.popleft()
            self.blocks.admit(seq, hits)
            self.blocks.grow(seq, num_new)
            seq.status = SequenceStatus.RUNNING
            seq.wait_for = None
            self.running.append(seq)
            batch.admitted.append((seq, len(seq)))
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
        self.waiting.extendleft_in_order(skipped)
        return batch

    def _sibling_ready(self, seq: Sequence) -> bool:
        """Sample k>0 of a request waits until sample 0 has computed the shared prompt blocks."""
        first = seq.wait_for
        if first.status == SequenceStatus.FINISHED or not self.blocks.enable_prefix_caching:
            return True
        if first.status == SequenceStatus.WAITING:
            return False
        return first.num_computed_tokens >= (seq.num_prompt_tokens // self.blocks.block_size) * self.blocks.block_size
