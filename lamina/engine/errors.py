"""Errors a request can be refused with; the server maps them onto OpenAI's error envelope.

A request is refused with a `RequestError` naming the parameter at fault (`param`, as OpenAI's
errors do), raised where the rule lives: `SamplingParams.validate` for the sampling settings,
`LLMEngine.validate` for what depends on the model (prompt ids, context length). The server turns
one into a 400 in a single place (`lamina.server.errors.from_request_error`).
"""
from __future__ import annotations


class RequestError(ValueError):
    """The request cannot be served as asked (HTTP 400). A ValueError, so library callers that
    catch ValueError keep working."""

    def __init__(self, message: str, param: str | None = None, code: str | None = "invalid_value"):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class ContextLengthExceeded(RequestError):
    def __init__(self, message: str, param: str | None = "messages", *, limit: int | None = None,
                 num_prompt_tokens: int | None = None, max_tokens: int | None = None):
        super().__init__(message, param=param, code="context_length_exceeded")
        self.limit, self.num_prompt_tokens, self.max_tokens = limit, num_prompt_tokens, max_tokens


def context_length_exceeded(limit: int, num_prompt_tokens: int, max_tokens: int | None,
                            param: str = "prompt") -> ContextLengthExceeded:
    """The one wording of "prompt (+ max_tokens) does not fit the context", OpenAI's. `param` is
    what the client sent the prompt as: "prompt" or "messages"."""
    if max_tokens is None or num_prompt_tokens >= limit:
        message = (f"This model's maximum context length is {limit} tokens. However, your {param} resulted in "
                   f"{num_prompt_tokens} tokens, which leaves no room for a completion. Please reduce the "
                   f"length of the {param}.")
    else:
        message = (f"This model's maximum context length is {limit} tokens. However, you requested "
                   f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the {param}, {max_tokens} "
                   f"in the completion). Please reduce the length of the {param} or completion.")
    return ContextLengthExceeded(message, param, limit=limit, num_prompt_tokens=num_prompt_tokens,
                                 max_tokens=max_tokens)


def check_context_length(limit: int, num_prompt_tokens: int, max_tokens: int | None,
                         param: str = "prompt") -> None:
    """Raise ContextLengthExceeded unless the prompt leaves room for at least one token, and
    for max_tokens of them when given."""
    if num_prompt_tokens >= limit or (max_tokens is not None and num_prompt_tokens + max_tokens > limit):
        raise context_length_exceeded(limit, num_prompt_tokens, max_tokens, param)


class EngineDeadError(RuntimeError):
    """The engine's step loop died; nothing more can be served (HTTP 503)."""


class RequestFailedError(RuntimeError):
    """The engine failed while serving this one request (HTTP 500); every other request goes on.
    The message is safe to show a client: the exception itself is only logged."""


class ParallelFailure(RuntimeError):
    """A tensor-parallel rank died, or a step failed while the ranks ran it together: they can no
    longer run in lockstep, so the engine cannot go on (retrying the step would deadlock)."""
