"""Errors a request can be refused with; the server maps them onto OpenAI's error envelope."""
from __future__ import annotations


class RequestError(ValueError):
    """The request cannot be served as asked (HTTP 400)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class ContextLengthExceeded(RequestError):
    def __init__(self, message: str, param: str | None = "messages"):
        super().__init__(message, param=param, code="context_length_exceeded")


class EngineDeadError(RuntimeError):
    """The engine's step loop died; nothing more can be served (HTTP 500/503)."""


class RequestFailedError(RuntimeError):
    """The engine failed while serving this one request (HTTP 500); every other request goes on.
    The message is safe to show a client: the exception itself is only logged."""
