"""Drafts from a second model: the target's own weights (exact, or its int8/int4 copy), or a
smaller model with the same tokenizer. Drafts are greedy (the draft's argmax), which verification
treats as a draft distribution with all its mass on one token.

A self-draft has the target's layers and heads, so it drafts over the target's own paged KV cache:
its first step feeds the sequence's last token (whose K/V the target has not computed yet), each
further step the draft before, at the next positions of the sequence's own block table. The
verification step then writes the target's K/V over every one of those slots before it reads them,
so the target never sees a draft model's K/V; and the draft reads the target's K/V of everything
already committed, so it never computes a prompt or catches up on accepted tokens.

Any other draft model has its own runner and paged KV cache, and a shadow Sequence per target
sequence that follows the target's committed tokens. Each step, one forward pass catches it up on
the tokens the target committed since the last step (its whole prompt the first time) and gives the
first draft token; k-1 decode steps give the rest.
"""
from __future__ import annotations

import logging
import os

import numpy as np

from lamina.config import EngineConfig, ModelConfig
from lamina.engine.kv_cache import BlockManager
from lamina.engine.model_runner import ModelRunner
from lamina.engine.resolve import COMPILED, ResolvedConfig, resolve
from lamina.engine.sampler import argmax_rows
from lamina.engine.scheduler import ScheduledBatch
from lamina.engine.sequence import Sequence
from lamina.engine.speculative import MAX_SPECULATIVE_TOKENS, SpeculativeConfig
from lamina.sampling_params import SamplingParams

log = logging.getLogger("lamina.engine")

# the draft's cache gets this share of the target's blocks: it only holds sequences that draft
DRAFT_CACHE_SHARE = 4


class DraftModel:
    def __init__(self, spec: SpeculativeConfig, target: ResolvedConfig, target_vocab: dict,
                 target_runner: ModelRunner, target_blocks: BlockManager):
        from lamina.tokenizer import Tokenizer
        name = spec.model or target.model_dir
        if os.path.isdir(name):
            model_dir = name
        else:
            from lamina.registry import resolve_model
            model_dir = resolve_model(name)
        if Tokenizer(model_dir).vocab() != target_vocab:
            raise ValueError(f"the draft model {name!r} has another tokenizer than the target: its tokens would "
                             f"mean other text")
        # the target's own weights draft over its cache, unless that cache is split across ranks
        self.shares_cache = (os.path.realpath(model_dir) == os.path.realpath(target.model_dir)
                             and target_runner.parallel is None)
        if self.shares_cache:
            num_blocks = target_runner.num_blocks
        else:
            min_blocks = -(-(target.max_model_len + spec.num_speculative_tokens) // target.block_size)
            num_blocks = max(target_runner.num_blocks // DRAFT_CACHE_SHARE, min_blocks)
        config = EngineConfig(
            model=model_dir, dtype=str(target.dtype).removeprefix("torch."), device=str(target.device),
            kv_cache_dtype=str(target.kv_cache_dtype).removeprefix("torch.") if self.shares_cache else "auto",
            quantization=spec.quantization, max_model_len=target.max_model_len, block_size=target.block_size,
            max_num_seqs=target.max_num_seqs, max_num_batched_tokens=target.max_num_batched_tokens,
            num_kv_blocks=num_blocks, enable_prefix_caching=False,
            attention_backend=target.backend.name, enforce_eager=target.execution != COMPILED,
            num_threads=target.num_threads)
        self.config = resolve(config, model_dir, ModelConfig.from_dir(model_dir))
        if self.shares_cache:
            self.runner = ModelRunner(self.config, kv_caches=(target_runner.k_caches, target_runner.v_caches))
            self.blocks = target_blocks
        else:
            self.runner = ModelRunner(self.config)
            self.blocks = BlockManager(self.runner.num_blocks, target.block_size, enable_prefix_caching=False)
        self.shadows: dict[int, Sequence] = {}       # target seq_id -> the draft model's view of it
        self._params = SamplingParams(max_tokens=None)
        log.info("draft model %s (%s): %s", name, "in the target's KV cache" if self.shares_cache else "its own KV cache",
                 self.config.summary())

    def wait_until_compiled(self, timeout: float | None = None) -> bool:
        compiled = self.runner.compiled
        return compiled is None or compiled.wait(timeout)

    def propose(self, seqs: list[Sequence], ks: list[int]) -> None:
        """Set seq.draft for each sequence (up to its k tokens; none where the draft's cache is full)."""
        if self.shares_cache:
            return self._propose_in_place(seqs, ks)
        targets, shadows, counts, wants = [], [], [], []
        for seq, k in zip(seqs, ks):
            shadow = self._shadow(seq)
            n = len(shadow) - shadow.num_computed_tokens
            if not self.blocks.can_grow(shadow, n + k - 1):
                self.release(seq)
                continue
            self.blocks.grow(shadow, n + k - 1)   # every block this step's drafting writes, up front
            targets.append(seq)
            shadows.append(shadow)
            counts.append(n)
            wants.append(k)
        if not shadows:
            return
        drafts: list[list[int]] = [[] for _ in shadows]
        step = ScheduledBatch(shadows, counts)
        while step.seqs:
            tokens = self._forward(step)
            for shadow, n, token in zip(step.seqs, step.num_new_tokens, tokens):
                shadow.num_computed_tokens += n
                shadow.token_ids.append(token)
            active = []
            for shadow, draft, k in zip(shadows, drafts, wants):
                if any(s is shadow for s in step.seqs) and len(draft) < k:
                    draft.append(shadow.token_ids[-1])
                    if len(draft) < k:   # the last draft token is never fed back
                        active.append(shadow)
            step = ScheduledBatch(active, [1] * len(active))
        for seq, draft in zip(targets, drafts):
            seq.draft = draft

    def _propose_in_place(self, seqs: list[Sequence], ks: list[int]) -> None:
        rows = []
        for seq, k in zip(seqs, ks):
            # room for the verification step's block too: a draft it could not verify is work thrown away
            if len(seq) - seq.num_computed_tokens != 1 or not self.blocks.can_grow(seq, 1 + k):
                continue
            self.blocks.grow(seq, k)
            seq.draft = []
            rows.append(_InPlaceRow(seq, k))
        while rows:
            for row, token in zip(rows, self._forward(ScheduledBatch(rows, [1] * len(rows)))):
                row.seq.draft.append(token)
            rows = [row for row in rows if len(row.seq.draft) < row.k]

    def _shadow(self, seq: Sequence) -> Sequence:
        """The draft model's sequence for seq, with seq's committed tokens and a cache valid for as
        many of them as it computed the same way (its last drafts may have been rejected since)."""
        shadow = self.shadows.get(seq.seq_id)
        if shadow is None:
            shadow = Sequence(seq.request_id, seq.index, [], self._params, None, seq.metrics)
            self.shadows[seq.seq_id] = shadow
        old, new = shadow.token_ids, seq.token_ids
        valid = min(shadow.num_computed_tokens, len(new) - 1)
        # only tokens drafted after the target's last commit can differ from what it kept
        i = max(0, valid - MAX_SPECULATIVE_TOKENS - 1)
        while i < valid and old[i] == new[i]:
            i += 1
        shadow.num_computed_tokens = i
        self.blocks.trim(shadow)
        shadow.token_ids = list(new)
        return shadow

    def _forward(self, batch: ScheduledBatch) -> list[int]:
        rows = [np.asarray([n - 1], dtype=np.int64) for n in batch.num_new_tokens]
        logits = self.runner.forward(*self.runner.prepare(batch, rows))
        return argmax_rows(logits)

    def release(self, seq: Sequence) -> None:
        """seq is done (or cannot draft now): its draft cache goes back to the pool."""
        shadow = self.shadows.pop(seq.seq_id, None)
        if shadow is not None:
            self.blocks.release(shadow)


class _InPlaceRow:
    """A sequence drafting in the target's cache, as the runner's prepare() reads it: one new token
    (its last committed one, then each draft) at the next position of its own block table."""

    def __init__(self, seq: Sequence, k: int):
        self.seq, self.k = seq, k
        self.block_table = seq.block_table

    @property
    def num_computed_tokens(self) -> int:
        return self.seq.num_computed_tokens + len(self.seq.draft)

    def step_token_ids(self, start: int, n: int) -> list[int]:
        return [(self.seq.draft or self.seq.token_ids)[-1]]
