"""Drafts from a second model: a smaller one with the same tokenizer, or the target's own int8/int4
copy. It has its own ModelRunner and paged KV cache, and a shadow Sequence per target sequence
that follows the target's committed tokens.

Each step, for the sequences that draft: one forward pass catches the draft model up on the tokens
the target committed since the last step (its whole prompt the first time) and gives the first
draft token; k-1 decode steps give the rest. Drafts are greedy (the draft's argmax), which
verification treats as a draft distribution with all its mass on one token.
"""
from __future__ import annotations

import logging
import os

import numpy as np

from lamina.config import EngineConfig, ModelConfig
from lamina.engine.kv_cache import BlockManager
from lamina.engine.resolve import COMPILED, ResolvedConfig, resolve
from lamina.engine.scheduler import ScheduledBatch
from lamina.engine.sequence import Sequence
from lamina.engine.speculative import MAX_SPECULATIVE_TOKENS, SpeculativeConfig
from lamina.sampling_params import SamplingParams

log = logging.getLogger("lamina.engine")

# the draft's cache gets this share of the target's blocks: it only holds sequences that draft
DRAFT_CACHE_SHARE = 4


class DraftModel:
    def __init__(self, spec: SpeculativeConfig, target: ResolvedConfig, target_vocab: dict, num_target_blocks: int):
        from lamina.engine.model_runner import ModelRunner
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
        min_blocks = -(-(target.max_model_len + spec.num_speculative_tokens) // target.block_size)
        config = EngineConfig(
            model=model_dir, dtype=str(target.dtype).removeprefix("torch."), device=str(target.device),
            quantization=spec.quantization, max_model_len=target.max_model_len, block_size=target.block_size,
            max_num_seqs=target.max_num_seqs, max_num_batched_tokens=target.max_num_batched_tokens,
            num_kv_blocks=max(num_target_blocks // DRAFT_CACHE_SHARE, min_blocks), enable_prefix_caching=False,
            attention_backend=target.backend.name, enforce_eager=target.execution != COMPILED,
            num_threads=target.num_threads)
        self.config = resolve(config, model_dir, ModelConfig.from_dir(model_dir))
        self.runner = ModelRunner(self.config)
        self.blocks = BlockManager(self.runner.num_blocks, target.block_size, enable_prefix_caching=False)
        self.shadows: dict[int, Sequence] = {}       # target seq_id -> the draft model's view of it
        self._params = SamplingParams(max_tokens=None)
        log.info("draft model %s: %s", name, self.config.summary())

    def wait_until_compiled(self, timeout: float | None = None) -> bool:
        compiled = self.runner.compiled
        return compiled is None or compiled.wait(timeout)

    def propose(self, seqs: list[Sequence], ks: list[int]) -> None:
        """Set seq.draft for each sequence (up to its k tokens; none where the draft's cache is full)."""
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
        return logits.argmax(dim=-1).tolist()

    def release(self, seq: Sequence) -> None:
        """seq is done (or cannot draft now): its draft cache goes back to the pool."""
        shadow = self.shadows.pop(seq.seq_id, None)
        if shadow is not None:
            self.blocks.release(shadow)
