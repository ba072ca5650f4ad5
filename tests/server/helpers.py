"""Raw-socket HTTP helpers for the server tests: exact bytes out, a strict parse of what comes back."""
from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field

MODEL = "smollm2-135m-instruct"


@dataclass
class RawResponse:
    status: int
    reason: str
    headers: dict[str, str]
    body: bytes
    chunked: bool = False
    chunks: list[bytes] = field(default_factory=list)  # the chunk payloads, as framed by the server

    def json(self):
        return json.loads(self.body)


class Conn:
    """One client connection that reads responses strictly (status line, headers, framing)."""

    def __init__(self, port: int, timeout: float = 60.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()

    def _more(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        self.buf += data
        return True

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._more():
                raise EOFError("connection closed mid-line")
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._more():
                raise EOFError("connection closed mid-body")
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def read_response(self, head_only: bool = False) -> RawResponse:
        status_line = self._line().decode()
        version, status, reason = status_line.split(" ", 2)
        assert version == "HTTP/1.1", status_line
        headers = {}
        while (line := self._line()) != b"":
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        resp = RawResponse(int(status), reason, headers, b"")
        if head_only or resp.status in (100, 204, 304):
            return resp
        if headers.get("transfer-encoding") == "chunked":
            resp.chunked = True
            while True:
                size = int(self._line(), 16)
                if size == 0:
                    assert self._line() == b""
                    break
                payload = self._exact(size)
                assert self._exact(2) == b"\r\n"
                resp.chunks.append(payload)
            resp.body = b"".join(resp.chunks)
        elif "content-length" in headers:
            resp.body = self._exact(int(headers["content-length"]))
        else:  # close-delimited
            while self._more():
                pass
            resp.body, self.buf = self.buf, b""
        return resp

    def closed_by_server(self, wait: float = 5.0) -> bool:
        """True if the server closes (EOF or reset) within `wait` seconds, with nothing more sent."""
        self.sock.settimeout(wait)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False


def request_bytes(method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                  version: str = "HTTP/1.1") -> bytes:
    lines = [f"{method} {path} {version}", "Host: 127.0.0.1"]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def http(port: int, method: str, path: str, obj=None, headers: dict | None = None, raw: bytes | None = None,
         timeout: float = 60.0) -> RawResponse:
    """One request on a fresh connection."""
    body = raw if raw is not None else (json.dumps(obj).encode() if obj is not None else None)
    hdrs = {"Content-Type": "application/json", **(headers or {})} if body is not None else (headers or {})
    c = Conn(port, timeout)
    try:
        c.send(request_bytes(method, path, body, hdrs))
        return c.read_response(head_only=method == "HEAD")
    finally:
        c.close()


def sse_events(body: bytes) -> list:
    """Parse an SSE body strictly: every non-empty line is `data: ...`, events end with a blank
    line, and nothing follows `data: [DONE]`. Returns the decoded events ("[DONE]" kept as a string)."""
    text = body.decode()
    assert text.endswith("data: [DONE]\n\n"), text[-200:]
    events = []
    for block in text.split("\n\n")[:-1]:
        lines = block.split("\n")
        assert len(lines) == 1, f"one data line per event, got {lines!r}"
        assert lines[0].startswith("data: "), lines[0]
        data = lines[0][len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    return events


def metrics(port: int, headers: dict | None = None) -> dict[str, float]:
    """/metrics as {sample name with labels: value}."""
    resp = http(port, "GET", "/metrics", headers=headers)
    assert resp.status == 200
    out = {}
    for line in resp.body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def metric(values: dict[str, float], name: str, **labels) -> float:
    for key, value in values.items():
        base, _, rest = key.partition("{")
        if base == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            return value
    raise KeyError(name)


def wait_idle(port: int, timeout: float = 15.0, headers: dict | None = None) -> dict[str, float]:
    """Poll /metrics until no request runs or waits and no KV block is in use."""
    end = time.monotonic() + timeout
    while True:
        m = metrics(port, headers)
        if (metric(m, "lamina:num_requests_running") == 0 and metric(m, "lamina:num_requests_waiting") == 0
                and metric(m, "lamina:kv_cache_usage_perc") == 0):
            return m
        if time.monotonic() > end:
            raise AssertionError(f"server not idle after {timeout}s: {m}")
        time.sleep(0.1)


class Proxy:
    """`inner` with some attributes replaced: an engine or tokenizer as the server sees it, with one
    behaviour changed for a test."""

    def __init__(self, inner, **overrides):
        self._inner = inner
        self.__dict__.update(overrides)

    def __getattr__(self, name):
        return getattr(self._inner, name)
