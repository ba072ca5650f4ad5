"""Every error the server sends, HTTP-level or OpenAI-level, in OpenAI's envelope:
{"error": {"message", "type", "param", "code"}}."""
from __future__ import annotations

import json

from lamina.engine.errors import RequestError

_DEFAULT_TYPE = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                 405: "invalid_request_error", 408: "invalid_request_error", 411: "invalid_request_error",
                 413: "invalid_request_error", 417: "invalid_request_error", 429: "rate_limit_error",
                 431: "invalid_request_error"}


class APIError(Exception):
    """An error response. `close` asks the HTTP layer to close the connection afterwards (used when
    the request's framing can no longer be trusted, e.g. an unread or malformed body)."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | int | None = None, headers: list[tuple[str, str]] | None = None,
                 close: bool = False):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _DEFAULT_TYPE.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.param = param
        self.code = code
        self.headers = list(headers or [])
        self.close = close

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def body(self) -> bytes:
        return json.dumps(self.to_dict()).encode()


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def from_request_error(e: RequestError) -> APIError:
    """The one mapping of a typed validation error (raised by SamplingParams, the engine or the
    server's own parsing) onto OpenAI's 400."""
    return APIError(400, e.message, param=e.param, code=e.code or "invalid_value")


def internal_error() -> APIError:
    # deterministic failures are not worth the client's automatic retries
    return APIError(500, "The server had an error while processing your request.",
                    headers=[("x-should-retry", "false")])
