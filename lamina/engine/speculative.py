"""Speculative decoding: guess a sequence's next k tokens cheaply, check all of them in one forward
pass of the model (a query of k+1 tokens), and keep the longest run the model agrees with plus one
token of its own. A step then yields 1 to k+1 tokens for about the cost of one, since a decode step
on these machines is bound by reading the weights, not by the few extra query rows.

Drafts come from the sequence's own text (n-gram prompt lookup: the tokens that followed the last
time its latest n tokens occurred), or from a smaller model with the same tokenizer decoding
greedily (draft_model.py; the target's own int4 copy serves). Verification keeps the model's
distribution exact: each position draws the token plain decoding would draw (the argmax for greedy
rows), and a draft token is kept while it equals that draw (see verify).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from lamina.engine.sampler import argmax_rows

MAX_SPECULATIVE_TOKENS = 16
# a sequence stops drafting when, after this many drafted tokens, fewer than this share were kept:
# each rejected draft token costs a query row for nothing
ADAPT_AFTER_TOKENS = 32
ADAPT_MIN_ACCEPTANCE = 0.25


METHODS = ("ngram", "draft_model")


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str                    # "ngram" | "draft_model"
    num_speculative_tokens: int
    prompt_lookup_max: int = 4     # ngram: n-gram sizes tried, longest first
    prompt_lookup_min: int = 1
    model: str | None = None       # draft_model: a name or path (None: the target model itself)
    quantization: str | None = None   # draft_model: None | int8 | int4

    @classmethod
    def parse(cls, value) -> "SpeculativeConfig | None":
        """vLLM's speculative_config: a dict or its JSON text (None: off)."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise ValueError("speculative_config must be a JSON object") from None
        if not isinstance(value, dict):
            raise ValueError("speculative_config must be an object")
        value = dict(value)
        method = value.pop("method", "ngram")
        if method not in METHODS:
            raise ValueError(f"speculative_config method {method!r} is not supported: use 'ngram' or 'draft_model'")
        k = value.pop("num_speculative_tokens", None)
        if not isinstance(k, int) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"speculative_config needs num_speculative_tokens in 1..{MAX_SPECULATIVE_TOKENS}")
        if method == "draft_model":
            model, quantization = value.pop("model", None), value.pop("quantization", None)
            if model is not None and not isinstance(model, str):
                raise ValueError("speculative_config model must be a model name or path")
            if quantization not in (None, "int8", "int4"):
                raise ValueError("speculative_config quantization must be null, 'int8' or 'int4'")
            if value:
                raise ValueError(f"unknown speculative_config keys for draft_model: {', '.join(sorted(value))}")
            return cls(method, k, model=model, quantization=quantization)
        hi = value.pop("prompt_lookup_max", 4)
        lo = value.pop("prompt_lookup_min", 1)
        if not (isinstance(hi, int) and isinstance(lo, int) and 1 <= lo <= hi <= 64):
            raise ValueError("speculative_config needs 1 <= prompt_lookup_min <= prompt_lookup_max <= 64")
        if value:
            raise ValueError(f"unknown speculative_config keys: {', '.join(sorted(value))}")
        return cls(method, k, hi, lo)

    def describe(self) -> str:
        if self.method == "draft_model":
            return (f"draft_model {self.model or 'the model itself'}"
                    f"{' ' + self.quantization if self.quantization else ''}, {self.num_speculative_tokens} tokens")
        return (f"{self.method}, {self.num_speculative_tokens} tokens, n-grams "
                f"{self.prompt_lookup_min}..{self.prompt_lookup_max}")


def propose_ngram(tokens: list[int], k: int, n_max: int, n_min: int) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the sequence's last n
    tokens, for the longest n in [n_min, n_max] that occurs; [] if none does."""
    length = len(tokens)
    if length < n_min + 1:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        tail = arr[length - n:]
        # windows ending before the tail itself: starts 0 .. length - n - 1
        windows = np.lib.stride_tricks.sliding_window_view(arr[:length - 1], n)
        hits = np.flatnonzero((windows == tail).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return tokens[start:start + k]
    return []


@dataclass
class SpecStats:
    """One sequence's drafting record, for the adaptive rule and the request's metrics."""
    drafted: int = 0
    accepted: int = 0

    @property
    def worth_it(self) -> bool:
        return self.drafted < ADAPT_AFTER_TOKENS or self.accepted >= ADAPT_MIN_ACCEPTANCE * self.drafted


def verify(probs: torch.Tensor, greedy: bool, draft: list[int], generator: torch.Generator | None) -> list[int]:
    """The tokens to keep from one sequence's verification: `probs` [k+1, V] is the target's
    distribution (after every sampling setting) at the k draft positions and the one after them.
    Returns the accepted drafts followed by one token of the target's own (the correction at the
    first rejection, else the bonus token).

    Each position draws the token plain decoding would draw there, from the same noise in the same
    order (the sampler's argmax of p / E, E exponential); a draft token is kept while it equals that
    draw. So a kept run is exactly what plain decoding samples, bit for bit with a per-request seed,
    and a draft token d is kept with probability p(d), as Leviathan et al.'s rejection rule keeps a
    draft that puts all its mass on one token."""
    k = len(draft)
    if greedy:
        best = argmax_rows(probs)
    out = []
    for i in range(k + 1):
        if greedy:
            token = best[i]
        else:
            noise = torch.empty(probs.shape[1]).exponential_(generator=generator)
            token = argmax_rows(probs[i] / noise)
        if i == k or token != draft[i]:
            return out + [token]
        out.append(token)
    return out
