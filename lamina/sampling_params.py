"""What a request asks of the sampler, and what comes back."""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field, replace

from lamina.engine.errors import RequestError

INT32_MAX = 2 ** 31 - 1
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1   # OpenAI's range for `seed`
MAX_N = 1024                 # samples per prompt (the server allows OpenAI's 128)
MAX_LOGPROBS = 20            # top alternatives per token, as OpenAI and vLLM allow
MAX_STOP_STRINGS = 4         # OpenAI's limit; every one is searched for after each token
MAX_STOP_LENGTH = 256        # characters; a held-back stream tail is compared against each prefix
MAX_TOKEN_IDS = 1024         # entries of logit_bias, and of stop_token_ids: applied per row each step
MAX_REPETITION_PENALTY = 100.0


MAX_GRAMMAR_CHARS = 1_000_000  # a schema, regex or grammar; the grammar engine bounds the work it does


@dataclass(frozen=True)
class StructuredOutputs:
    """What a request's output must match; exactly one field is set.

    json: a JSON schema (a dict or its JSON text); json_object: any JSON object; regex: a regular
    expression (Rust regex syntax) the whole output matches; choice: one of these strings exactly;
    grammar: a context-free grammar in Lark or GBNF (llama.cpp's) syntax."""
    json: dict | str | None = None
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | tuple[str, ...] | None = None
    grammar: str | None = None

    KINDS = ("json", "json_object", "regex", "choice", "grammar")

    @classmethod
    def of(cls, value) -> "StructuredOutputs | None":
        """None, an instance, or a dict with the same keys (vLLM's `structured_outputs`)."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise RequestError("Invalid type for 'structured_outputs': expected an object with one of "
                               f"{', '.join(cls.KINDS)}.", param="structured_outputs", code="invalid_type")
        unknown = set(value) - set(cls.KINDS)
        if unknown:
            raise RequestError(f"Unknown field(s) in 'structured_outputs': {', '.join(sorted(map(str, unknown)))}; "
                               f"expected one of {', '.join(cls.KINDS)}.", param="structured_outputs")
        return cls(**value)

    def __post_init__(self):
        given = [k for k in self.KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise RequestError("'structured_outputs' must set exactly one of "
                               f"{', '.join(self.KINDS)}; got {', '.join(given) or 'none'}.",
                               param="structured_outputs")
        kind, value = given[0], getattr(self, given[0])
        where = f"structured_outputs.{kind}"
        if kind == "json" and not isinstance(value, (dict, str)):
            raise RequestError(f"'{where}' must be a JSON schema (an object, or its JSON text).", param=where,
                               code="invalid_type")
        if kind == "json_object" and value is not True:
            raise RequestError(f"'{where}' must be true.", param=where, code="invalid_type")
        if kind in ("regex", "grammar") and (not isinstance(value, str) or not value):
            raise RequestError(f"'{where}' must be a non-empty string.", param=where, code="invalid_type")
        if kind == "choice":
            if not isinstance(value, (list, tuple)) or not value:
                raise RequestError(f"'{where}' must be a non-empty array of strings.", param=where)
            if not all(isinstance(c, str) and c for c in value):
                raise RequestError(f"'{where}' must hold non-empty strings only.", param=where)
            object.__setattr__(self, "choice", tuple(value))
        if len(self.key[1]) > MAX_GRAMMAR_CHARS:
            raise RequestError(f"'{where}' is longer than {MAX_GRAMMAR_CHARS} characters.", param=where)

    @property
    def kind(self) -> str:
        return next(k for k in self.KINDS if getattr(self, k) not in (None, False))

    @property
    def key(self) -> tuple[str, str]:
        """(kind, canonical text): equal keys compile to the same grammar."""
        kind, value = self.kind, getattr(self, self.kind)
        if kind == "json" and isinstance(value, dict):
            value = json.dumps(value, sort_keys=True, separators=(",", ":"))
        elif kind == "choice":
            value = json.dumps(list(value))
        elif kind == "json_object":
            value = ""
        return kind, value


def _short(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass
class SamplingParams:
    """Sampling settings of one request. `None` means "the model's generation_config.json default,
    else the usual default" (temperature 1, top_p 1, no top_k, no min_p, repetition_penalty 1)."""
    n: int = 1
    max_tokens: int | None = 16          # None: until EOS or the context is full
    min_tokens: int = 0
    temperature: float | None = None     # 0 = greedy
    top_p: float | None = None
    top_k: int | None = None             # 0 or -1 = off
    min_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    logprobs: int | None = None          # None: off; k >= 0: the sampled token's logprob plus the top k
    prompt_logprobs: int | None = None   # None: off; k >= 0: logprob of each prompt token plus top k
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputs | dict | None = None   # constrain the output (grammar)

    def __post_init__(self):
        self.structured_outputs = StructuredOutputs.of(self.structured_outputs)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    def validate(self) -> None:
        """Raise RequestError (a ValueError) naming the first field out of its range. Every number
        is bounded: what reaches the sampler fits its tensors and cannot overflow in a step."""
        def bad(name, why, value=None, got=None):
            got = got or _short(getattr(self, name) if value is None else value)
            raise RequestError(f"Invalid value for '{name}': {why}, got {got}.", param=name)

        def integer(name, lo, hi, value=None, optional=False):
            v = getattr(self, name) if value is None else value
            if v is None and optional:
                return
            if not isinstance(v, numbers.Integral) or isinstance(v, bool):   # numpy ints too
                bad(name, "expected an integer", v)
            if not lo <= v <= hi:
                bad(name, f"must be between {lo} and {hi}", v)

        def number(name, lo, hi, value=None, optional=False, lo_open=False):
            v = getattr(self, name) if value is None else value
            if v is None and optional:
                return
            if not isinstance(v, numbers.Real) or isinstance(v, bool):
                bad(name, "expected a number", v)
            if not (lo < v if lo_open else lo <= v) or not v <= hi or math.isinf(v):  # NaN fails both
                bad(name, f"must be {'greater than' if lo_open else 'at least'} {lo} and finite" if hi == math.inf
                    else f"must be in {'(' if lo_open else '['}{lo}, {hi}]", v)

        integer("n", 1, MAX_N)
        integer("max_tokens", 0, INT32_MAX, optional=True)
        integer("min_tokens", 0, INT32_MAX if self.max_tokens is None else self.max_tokens)
        number("temperature", 0, math.inf, optional=True)
        number("top_p", 0, 1, optional=True, lo_open=True)
        integer("top_k", -1, INT32_MAX, optional=True)
        number("min_p", 0, 1, optional=True)
        number("presence_penalty", -2, 2)
        number("frequency_penalty", -2, 2)
        number("repetition_penalty", 0, MAX_REPETITION_PENALTY, optional=True, lo_open=True)
        integer("seed", INT64_MIN, INT64_MAX, optional=True)
        integer("logprobs", 0, MAX_LOGPROBS, optional=True)
        integer("prompt_logprobs", 0, MAX_LOGPROBS, optional=True)
        bias = self.logit_bias or {}
        if not isinstance(bias, dict) or len(bias) > MAX_TOKEN_IDS:
            bad("logit_bias", f"expected a mapping of at most {MAX_TOKEN_IDS} token ids to biases",
                got=f"{len(bias)} entries" if isinstance(bias, dict) else None)
        for token, value in bias.items():
            if not isinstance(token, numbers.Integral) or isinstance(token, bool) or not 0 <= token <= INT32_MAX:
                bad("logit_bias", "keys must be token ids (non-negative integers)", token)
            number("logit_bias", -100, 100, value=value)
        if len(self.stop_token_ids) > MAX_TOKEN_IDS:
            bad("stop_token_ids", f"at most {MAX_TOKEN_IDS} ids", got=f"{len(self.stop_token_ids)}")
        for token in self.stop_token_ids:
            integer("stop_token_ids", 0, INT32_MAX, value=token)
        if len(self.stop) > MAX_STOP_STRINGS:
            bad("stop", f"at most {MAX_STOP_STRINGS} stop strings", got=f"{len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str):
                bad("stop", "stop strings must be strings", s)
            if len(s) > MAX_STOP_LENGTH:
                bad("stop", f"a stop string may be at most {MAX_STOP_LENGTH} characters long",
                    got=f"one of {len(s)}")

    def check_token_ids(self, vocab_size: int) -> None:
        """Token ids the request names (logit_bias, stop_token_ids) must index the model's logits:
        `vocab_size` is their width (the model config's vocab_size), which can differ from the
        tokenizer's vocabulary."""
        for token in (self.logit_bias or {}):
            if token >= vocab_size:
                raise RequestError(f"Invalid key in 'logit_bias': token id {token} is outside the vocabulary "
                                   f"(0..{vocab_size - 1}).", param="logit_bias")
        for token in self.stop_token_ids:
            if token >= vocab_size:
                raise RequestError(f"Invalid value for 'stop_token_ids': token id {token} is outside the "
                                   f"vocabulary (0..{vocab_size - 1}).", param="stop_token_ids")

    def with_defaults(self, defaults: dict) -> "SamplingParams":
        """Fill unset fields from the model's generation_config.json, then the usual defaults."""
        def pick(name, fallback):
            value = getattr(self, name)
            if value is None:
                value = defaults.get(name)
            return fallback if value is None else value
        return replace(
            self,
            temperature=pick("temperature", 1.0),
            top_p=pick("top_p", 1.0),
            top_k=pick("top_k", 0),
            min_p=pick("min_p", 0.0),
            repetition_penalty=pick("repetition_penalty", 1.0),
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        """Whether a penalty needs the token history (prompt and output) when sampling."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token_id, logprob), most likely first


@dataclass
class CompletionOutput:
    index: int
    text: str = ""                            # everything generated so far (stop strings removed)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None          # stop | length | abort | error (the engine failed this request)
    stop_reason: int | str | None = None      # the stop string or token id that ended it
    # what is new since the previous output of this request (streaming)
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[TokenLogprob] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    spec_drafted: int = 0       # speculative decoding: draft tokens verified for this request
    spec_accepted: int = 0      # ... and kept


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0                # prompt tokens served from the prefix cache
    metrics: RequestMetrics | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    error: str | None = None                  # why the engine failed this request (finish_reason "error")

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason
