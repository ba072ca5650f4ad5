"""The state of one sequence (one of a request's `n` samples) as it moves through the engine."""
from __future__ import annotations

import enum
import itertools

import torch

from lamina.engine.speculative import SpecStats
from lamina.sampling_params import RequestMetrics, SamplingParams, TokenLogprob
from lamina.tokenizer import IncrementalDetokenizer


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


class Sequence:
    def __init__(self, request_id: str, index: int, prompt_token_ids: list[int], params: SamplingParams,
                 detokenizer: IncrementalDetokenizer, metrics: RequestMetrics):
        self.seq_id = next(_ids)
        self.request_id = request_id
        self.index = index                    # which of the request's n samples
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0          # tokens whose K/V are in the cache
        self.num_cached_tokens = 0            # prompt tokens that came from the prefix cache
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []     # chained hashes of the full blocks registered so far
        self.detokenizer = detokenizer
        self.metrics = metrics
        self.generator = None
        if params.seed is not None:
            # one stream per sample, so n seeded samples differ but are each reproducible
            self.generator = torch.Generator().manual_seed(params.seed + index)
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: list[TokenLogprob | None] | None = (
            [None] if params.prompt_logprobs is not None else None)
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.text = ""                        # detokenized output, stop strings cut off
        self.num_text_sent = 0                # characters of `text` already streamed out
        self.num_tokens_sent = 0
        self.num_logprobs_sent = 0
        self.wait_for: "Sequence | None" = None  # a sibling whose prompt blocks this one should reuse
        self.last_token_time: float | None = None
        # structured outputs: the compile this sequence waits for before it may run, then its state
        self.awaiting_grammar = None          # a Future of a CompiledGrammar
        self.grammar = None                   # a GrammarState
        # speculative decoding: tokens guessed for this step (not yet the sequence's), and its record
        self.draft: list[int] = []
        self.spec = SpecStats()

    def __len__(self) -> int:
        return len(self.token_ids)

    def step_token_ids(self, start: int, n: int) -> list[int]:
        """The n tokens a step computes from position `start`: known tokens, then the draft's."""
        ids = self.token_ids[start:start + n]
        return ids + self.draft[:n - len(ids)] if len(ids) < n else ids

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def in_prefill(self) -> bool:
        return self.num_computed_tokens < len(self.token_ids) - 1

    def num_blocks_needed(self, num_tokens: int, block_size: int) -> int:
        return (num_tokens + block_size - 1) // block_size
