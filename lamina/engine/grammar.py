"""Structured outputs: a request's StructuredOutputs becomes a grammar, compiled once and off the
step thread; each sequence then carries its own GrammarState, and before each sample the engine
asks every constrained row which tokens may come next (a bitmask) and masks the rest of the logits.

The grammar engine is llguidance: it takes JSON schemas, regexes, Lark and GBNF grammars, builds
its token masks lazily from the tokenizer's byte trie (no per-grammar precomputation over the
vocabulary), computes a batch of masks on its own threads without the GIL, and can roll a state
back by n tokens, which speculative decoding will need.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import llguidance as llg
import torch

from lamina.engine.errors import RequestError
from lamina.sampling_params import StructuredOutputs

# JSON on one line with the usual spaces after ',' and ':'. Free whitespace is what a small model
# repeats until max_tokens when it hesitates, and nothing a program reads needs it.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CACHE_SIZE = 256          # compiled grammars kept, by key; a compiled grammar is a few hundred KB at most
MAX_ERROR_CHARS = 600


def grammar_source(spec: StructuredOutputs) -> str:
    """The spec as llguidance's grammar text (checked only when compiled)."""
    try:
        return _source(spec)
    except ValueError as e:   # a schema that is not JSON, a GBNF grammar that does not convert
        raise _invalid(spec, str(e)) from None


def _source(spec: StructuredOutputs) -> str:
    kind = spec.kind
    if kind == "json":
        return llg.LLMatcher.grammar_from_json_schema(spec.json, defaults=JSON_LAYOUT)
    if kind == "json_object":
        return llg.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_LAYOUT)
    if kind == "regex":
        return llg.LLMatcher.grammar_from_regex(spec.regex)
    if kind == "choice":   # Lark string literals take JSON's escapes
        return llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec.choice))
    return llg.grammar_from("grammar", spec.grammar)   # Lark, or GBNF converted to Lark


def _invalid(spec: StructuredOutputs, why: str) -> RequestError:
    what = {"json": "JSON schema", "regex": "regular expression", "grammar": "grammar",
            "choice": "choice", "json_object": "json_object"}[spec.kind]
    why = why.strip()
    if len(why) > MAX_ERROR_CHARS:
        why = why[:MAX_ERROR_CHARS] + "..."
    return RequestError(f"Invalid {what}: {why}", param=f"structured_outputs.{spec.kind}")


class CompiledGrammar:
    """A grammar ready to use: its start state, copied for each sequence."""

    def __init__(self, start: llg.LLMatcher):
        self._start = start

    def new_state(self) -> "GrammarState":
        return GrammarState(self._start.deep_copy())


class GrammarState:
    """Where one sequence's output stands in its grammar. It advances only on tokens the sequence
    keeps."""

    def __init__(self, matcher: llg.LLMatcher):
        self.matcher = matcher

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {self.matcher.get_error()}")

    @property
    def finished(self) -> bool:
        """Accepting, with nothing that may follow: the output is complete."""
        return self.matcher.is_stopped()


class GrammarCompiler:
    """Compiles grammars on one background thread and keeps the results by key, so a request waits
    for its own grammar while the step loop goes on, and a schema seen before costs nothing."""

    def __init__(self, tokenizer_json: str, vocab_width: int, eos_token_ids: list[int]):
        self._tokenizer_json, self._vocab_width, self._eos = tokenizer_json, vocab_width, sorted(eos_token_ids)
        self._tokenizer: llg.LLTokenizer | None = None
        self._cache: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lamina-grammar")

    def compile(self, spec: StructuredOutputs) -> Future:
        """A future of the CompiledGrammar; it raises RequestError (a 400) if the spec is invalid."""
        key = spec.key
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                return future
            future = self._pool.submit(self._compile, spec)
            self._cache[key] = future
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
            return future

    def _compile(self, spec: StructuredOutputs) -> CompiledGrammar:
        if self._tokenizer is None:   # a few hundred ms: paid by the first constrained request only
            self._tokenizer = llg.LLTokenizer(self._tokenizer_json, n_vocab=self._vocab_width, eos_token=self._eos)
        matcher = llg.LLMatcher(self._tokenizer, grammar_source(spec), log_level=0)
        if matcher.is_error():
            raise _invalid(spec, matcher.get_error())
        return CompiledGrammar(matcher)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class TokenMasks:
    """Allowed-token masks for a batch of rows, computed by llguidance's thread pool in one call."""

    def __init__(self, vocab_width: int):
        self.vocab_width = vocab_width
        self.words = (vocab_width + 31) // 32
        self._executor = llg.LLExecutor()
        self._shifts = torch.arange(32, dtype=torch.int32)

    def allowed(self, states: list[GrammarState | None], device: torch.device) -> torch.Tensor | None:
        """[rows, vocab] bool, True where a token may be sampled; None if no row is constrained."""
        rows = [(s.matcher, i) for i, s in enumerate(states) if s is not None]
        if not rows:
            return None
        bits = torch.full((len(states), self.words), -1, dtype=torch.int32)   # unconstrained rows: all allowed
        self._executor.unsafe_compute_mask_ptr(rows, bits.data_ptr(), self.words * 4, len(states))
        allowed = ((bits.unsqueeze(-1) >> self._shifts) & 1).view(len(states), -1)[:, :self.vocab_width]
        return allowed.bool().to(device)
