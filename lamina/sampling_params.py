"""What a request asks of the sampler, and what comes back."""
from __future__ import annotations

from dataclasses import dataclass, field, replace


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

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    def validate(self) -> None:
        def bad(name, why):
            raise ValueError(f"{name} {why}, got {getattr(self, name)!r}")
        if self.n < 1:
            bad("n", "must be at least 1")
        if self.max_tokens is not None and self.max_tokens < 0:
            bad("max_tokens", "must be non-negative")
        if self.min_tokens < 0 or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
            bad("min_tokens", "must be between 0 and max_tokens")
        if self.temperature is not None and not 0 <= self.temperature:
            bad("temperature", "must be non-negative")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if self.top_k is not None and self.top_k < -1:
            bad("top_k", "must be -1, 0 (off) or positive")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            bad("min_p", "must be in [0, 1]")
        if not -2 <= self.presence_penalty <= 2:
            bad("presence_penalty", "must be in [-2, 2]")
        if not -2 <= self.frequency_penalty <= 2:
            bad("frequency_penalty", "must be in [-2, 2]")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            bad("repetition_penalty", "must be positive")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            bad("logprobs", "must be in [0, 20]")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            bad("prompt_logprobs", "must be in [0, 20]")
        for token, bias in (self.logit_bias or {}).items():
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias for token {token} must be in [-100, 100], got {bias}")

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
