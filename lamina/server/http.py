"""HTTP/1.1 on asyncio streams: request parsing with limits, keep-alive, whole and streamed responses.

One task per connection reads a request head (bounded in size and time), lets the application
refuse it from the head alone (`check_head`: the API key, before any body is read or 100 Continue
sent), reads its body (Content-Length or chunked, bounded in size and by one deadline for the
whole body), then hands a `Request` and an `Exchange` (the response side) to the application's
handler. Open connections are capped; one over the cap is answered 503 and closed. While the handler runs, a watcher reads ahead on the socket so that a
client that goes away is noticed at once: the handler task is cancelled, which aborts its engine
request. Framing errors get an error response and a lingering close; nothing a client sends can
raise out of a connection task.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Awaitable, Callable
from urllib.parse import urlsplit

from lamina.server.errors import APIError, internal_error

log = logging.getLogger("lamina.server")
access_log = logging.getLogger("lamina.server.access")

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_VERSION = re.compile(r"HTTP/(\d)\.(\d)")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_BAD_TARGET = re.compile(r"[\x00-\x20\x7f-\xff]")
_DIGITS = re.compile(r"[0-9]{1,20}")   # not str.isdigit(): that also takes '²' and other scripts' digits
_READ_SIZE = 1 << 16


@dataclass
class Limits:
    max_header_bytes: int = 16 * 1024   # request line plus headers
    max_headers: int = 100
    max_body_bytes: int = 32 << 20
    max_connections: int = 512          # open at once; more are answered 503 and closed
    keep_alive_timeout: float = 15.0    # idle time allowed before (and between) requests
    header_timeout: float = 10.0        # from a request's first byte to the end of its headers
    body_timeout: float = 60.0          # from the end of the headers to the end of the body
    write_timeout: float = 60.0         # longest wait on a client that does not read its response


class ClientGone(Exception):
    """The client closed the connection, reset it, or stopped reading."""


@dataclass
class Request:
    method: str
    target: str
    path: str
    query: str
    version: str
    headers: dict[str, str]             # lower-case names; repeated headers joined with ", "
    peer: str = "-"
    body: bytes = b""
    keep_alive: bool = True

    def header(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name.lower(), default)


def parse_head(head: bytes, limits: Limits, peer: str = "-") -> Request:
    """Request line and header fields (without the blank line) -> Request; APIError on bad input."""
    lines = [line[:-1] if line.endswith(b"\r") else line for line in head.split(b"\n")]
    if len(lines) - 1 > limits.max_headers:
        raise APIError(431, f"too many header fields (at most {limits.max_headers})", close=True)
    parts = lines[0].decode("latin-1").split(" ")
    if len(parts) != 3:
        raise APIError(400, "malformed request line", close=True)
    method, target, version = parts
    if not _TOKEN.fullmatch(method.encode("latin-1")):
        raise APIError(400, "malformed request method", close=True)
    m = _VERSION.fullmatch(version)
    if not m:
        raise APIError(400, "malformed HTTP version", close=True)
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise APIError(505, f"HTTP version {version[5:]} is not supported", type="invalid_request_error",
                       close=True)
    if not target or _BAD_TARGET.search(target):
        raise APIError(400, "malformed request target", close=True)
    if target.startswith("/"):
        path, _, query = target.partition("?")
        path = path.partition("#")[0]
    elif target.startswith(("http://", "https://")):
        split = urlsplit(target)
        path, query = split.path or "/", split.query
    elif target == "*" and method == "OPTIONS":
        path, query = "*", ""
    else:
        raise APIError(400, "malformed request target", close=True)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            raise APIError(400, "obsolete header line folding is not allowed", close=True)
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(name):
            raise APIError(400, "malformed header field", close=True)
        value = value.strip(b" \t")
        if _BAD_VALUE.search(value):
            raise APIError(400, "invalid character in a header value", close=True)
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    keep_alive = "keep-alive" in tokens if version == "HTTP/1.0" else "close" not in tokens
    return Request(method, target, path, query, version, headers, peer, keep_alive=keep_alive)


def _body_length(req: Request, limits: Limits) -> int | None:
    """Bytes of body announced by Content-Length (0 if none), or None for a chunked body."""
    te, cl = req.header("transfer-encoding"), req.header("content-length")
    if te is not None:
        if cl is not None:
            raise APIError(400, "a request must not have both Content-Length and Transfer-Encoding", close=True)
        if [c.strip().lower() for c in te.split(",")] != ["chunked"]:
            raise APIError(501, f"unsupported Transfer-Encoding {te!r}; use Content-Length or chunked",
                           type="invalid_request_error", close=True)
        if req.version == "HTTP/1.0":
            raise APIError(400, "chunked request bodies need HTTP/1.1", close=True)
        return None
    if cl is None:
        return 0
    values = {v.strip(" \t") for v in cl.split(",")}
    if len(values) != 1 or not _DIGITS.fullmatch(next(iter(values))):
        raise APIError(400, "invalid Content-Length: expected one decimal number", close=True)
    length = int(values.pop())
    if length > limits.max_body_bytes:
        raise APIError(413, f"request body too large: {length} bytes (limit {limits.max_body_bytes})",
                       close=True)
    return length


class Exchange:
    """The response side of one request. A handler either sends one whole response (`send`,
    `send_json`) or streams one (`start_stream`, `write`..., `end_stream`): chunked on HTTP/1.1,
    close-delimited on HTTP/1.0. `log_extra` is appended to the request's access-log line."""

    def __init__(self, conn: "_Connection", req: Request):
        self.conn, self.req = conn, req
        self.status: int | None = None
        self.started = self.finished = self.chunked = False
        self.close = not req.keep_alive or conn.server.draining
        self.t0 = time.monotonic()
        self.bytes_out = 0
        self.log_extra = ""

    def _head(self, status: int, headers, length: int | None = None) -> bytes:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Unknown"
        lines = [f"HTTP/1.1 {status} {reason}", f"Date: {formatdate(usegmt=True)}", "Server: lamina"]
        lines += [f"{k}: {v}" for k, v in headers]
        if length is not None:
            lines.append(f"Content-Length: {length}")
        elif self.chunked:
            lines.append("Transfer-Encoding: chunked")
        if self.close:
            lines.append("Connection: close")
        else:
            lines.append("Connection: keep-alive")
            lines.append(f"Keep-Alive: timeout={int(self.conn.server.limits.keep_alive_timeout)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def send(self, status: int, body: bytes, content_type: str = "application/json",
                   headers=()) -> None:
        assert not self.started, "response already started"
        self.status, self.started = status, True
        head = self._head(status, [("Content-Type", content_type), *headers], length=len(body))
        await self.conn.write(head if self.req.method == "HEAD" else head + body)
        self.bytes_out += len(body)
        self.finished = True

    async def send_json(self, status: int, obj, headers=()) -> None:
        await self.send(status, json.dumps(obj).encode(), headers=headers)

    async def send_error(self, err: APIError) -> None:
        if err.close:
            self.close = True
        await self.send(err.status, err.body(), headers=err.headers)

    async def start_stream(self, status: int = 200, content_type: str = "text/event-stream",
                           headers=()) -> None:
        assert not self.started, "response already started"
        self.chunked = self.req.version == "HTTP/1.1"
        if not self.chunked:
            self.close = True  # HTTP/1.0: the body ends when the connection closes
        self.status, self.started = status, True
        await self.conn.write(self._head(
            status, [("Content-Type", content_type), ("Cache-Control", "no-cache"),
                     ("X-Accel-Buffering", "no"), *headers]))

    async def write(self, data: bytes) -> None:
        """Send one piece of a streamed body; returns once it is handed to the socket."""
        if not data:
            return
        self.bytes_out += len(data)
        await self.conn.write(b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data)

    async def end_stream(self) -> None:
        if self.chunked:
            await self.conn.write(b"0\r\n\r\n")
        self.finished = True


Handler = Callable[[Request, Exchange], Awaitable[None]]
HeadCheck = Callable[[Request], None]   # raises APIError to refuse a request before its body is read


class _Connection:
    def __init__(self, server: "HttpServer", reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.server, self.reader, self.writer = server, reader, writer
        self.limits = server.limits
        self.buf = bytearray()
        self.eof = False
        self.busy = False  # a request's head has arrived and its response is not finished
        self.task = asyncio.current_task()
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "-"

    # -- reading -------------------------------------------------------------------------------
    async def _fill(self, timeout: float | None, hint: int = _READ_SIZE) -> bool:
        """Read more into the buffer; False at end of stream. Raises asyncio.TimeoutError."""
        if self.eof:
            return False
        try:
            data = await asyncio.wait_for(self.reader.read(max(hint, _READ_SIZE)), timeout)
        except asyncio.TimeoutError:  # (an OSError on Python 3.11+: must come first)
            raise
        except (ConnectionError, OSError):
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    async def _read_head(self) -> bytes | None:
        """The next request's head, or None if the client closed or stayed idle too long. Blank
        lines before a request line are ignored (RFC 9112 2.2), but they do not restart the idle
        timer: a client sending only CRLFs is closed after keep_alive_timeout like a silent one."""
        loop = asyncio.get_running_loop()
        idle_deadline = loop.time() + self.limits.keep_alive_timeout
        while True:
            skip = 0
            while skip < len(self.buf) and self.buf[skip] in b"\r\n":
                skip += 1
            del self.buf[:skip]
            if self.buf:
                break
            try:
                if not await self._fill(max(0.0, idle_deadline - loop.time())):
                    return None
            except asyncio.TimeoutError:
                return None
        deadline = loop.time() + self.limits.header_timeout
        while True:
            m = _HEAD_END.search(self.buf)
            if m and m.start() <= self.limits.max_header_bytes:
                head = bytes(self.buf[:m.start()])
                del self.buf[:m.end()]
                return head
            if len(self.buf) > self.limits.max_header_bytes:
                raise APIError(431, f"request headers too large (limit {self.limits.max_header_bytes} bytes)",
                               close=True)
            try:
                ok = await self._fill(max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise APIError(408, "timed out reading the request headers", close=True) from None
            if not ok:
                raise ClientGone()

    async def _fill_body(self, deadline: float, hint: int = _READ_SIZE) -> None:
        """Read more of a body before `deadline` (the whole body's, not each read's)."""
        try:
            ok = await self._fill(max(0.0, deadline - asyncio.get_running_loop().time()), hint)
        except asyncio.TimeoutError:
            raise APIError(408, "timed out reading the request body", close=True) from None
        if not ok:
            raise ClientGone()

    async def _read_exact(self, n: int, deadline: float) -> bytes:
        while len(self.buf) < n:
            await self._fill_body(deadline, n - len(self.buf))
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    async def _read_crlf_line(self, deadline: float, limit: int = 4096) -> bytes:
        """One line of chunked framing, which must end with CRLF: a bare LF or a stray CR is a
        framing error (lenient line endings are how request smuggling slips between proxies)."""
        while (i := self.buf.find(b"\n")) < 0:
            if len(self.buf) > limit:
                raise APIError(400, "malformed chunked body: line too long", close=True)
            await self._fill_body(deadline)
        if i == 0 or self.buf[i - 1] != 0x0D or b"\r" in self.buf[:i - 1] or i > limit:
            raise APIError(400, "malformed chunked body: lines must end with CRLF", close=True)
        line = bytes(self.buf[:i - 1])
        del self.buf[:i + 1]
        return line

    async def _read_body(self, req: Request) -> bytes:
        length = _body_length(req, self.limits)
        expect = req.header("expect")
        if expect is not None:
            if expect.lower() != "100-continue":
                raise APIError(417, f"unsupported Expect: {expect}", close=True)
            if req.version == "HTTP/1.1" and length != 0 and not self.buf:
                await self.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        deadline = asyncio.get_running_loop().time() + self.limits.body_timeout
        if length is not None:
            return await self._read_exact(length, deadline) if length else b""
        parts, total = [], 0
        while True:
            line = await self._read_crlf_line(deadline)
            size = line.split(b";", 1)[0].strip(b" \t")
            if not size or len(size) > 16 or not all(c in b"0123456789abcdefABCDEF" for c in size):
                raise APIError(400, "malformed chunked body", close=True)
            n = int(size, 16)
            if n == 0:
                break
            total += n
            if total > self.limits.max_body_bytes:
                raise APIError(413, f"request body too large (limit {self.limits.max_body_bytes} bytes)",
                               close=True)
            parts.append(await self._read_exact(n, deadline))
            if await self._read_exact(2, deadline) != b"\r\n":
                raise APIError(400, "malformed chunked body: chunk data must end with CRLF", close=True)
        trailer_bytes = 0
        while (line := await self._read_crlf_line(deadline)) != b"":  # trailer fields: read and dropped
            trailer_bytes += len(line)
            if trailer_bytes > self.limits.max_header_bytes:
                raise APIError(431, "request trailers too large", close=True)
        return b"".join(parts)

    async def _watch(self) -> None:
        """Runs while a handler does: reads ahead (keeping the bytes for the next request) and
        returns as soon as the client has closed or reset the connection."""
        while len(self.buf) <= self.limits.max_header_bytes:
            if not await self._fill(None):
                return
        await asyncio.Event().wait()  # a pipelined request waits in the buffer; stop reading

    # -- writing -------------------------------------------------------------------------------
    async def write(self, data: bytes) -> None:
        transport = self.writer.transport
        if transport.is_closing():
            raise ClientGone()
        self.writer.write(data)
        if transport.get_write_buffer_size() == 0:
            return
        try:
            await asyncio.wait_for(self.writer.drain(), self.limits.write_timeout)
        except asyncio.TimeoutError:
            raise ClientGone("client stopped reading") from None
        except (ConnectionError, OSError):
            raise ClientGone() from None

    # -- the request loop ----------------------------------------------------------------------
    async def run(self) -> None:
        try:
            while not self.server.draining:
                req = None
                try:
                    head = await self._read_head()
                    if head is None:
                        break
                    self.busy = True
                    req = parse_head(head, self.limits, self.peer)
                    if self.server.check_head is not None:
                        self.server.check_head(req)
                    req.body = await self._read_body(req)
                except APIError as err:
                    await self._refuse(req, err)
                    break
                if not await self._dispatch(req):
                    break
                self.busy = False
        except (ClientGone, ConnectionError, OSError):
            pass
        except Exception:  # a bug here must not take the server down
            log.exception("connection %s failed", self.peer)
        finally:
            self.busy = False
            self.server.connections.discard(self)
            await self._close()

    async def _refuse(self, req: Request | None, err: APIError, linger: float = 2.0) -> None:
        """Answer a request that could not be read (or was refused from its head), then close."""
        ex = Exchange(self, req or Request("-", "-", "-", "", "HTTP/1.1", {}, self.peer, keep_alive=False))
        ex.close = True
        try:
            await ex.send_error(err)
        except ClientGone:
            return
        self.server.log_access(ex)
        await self._linger(linger)

    async def _dispatch(self, req: Request) -> bool:
        """Run the handler for one request; True if the connection may serve another."""
        ex = Exchange(self, req)
        handler = asyncio.create_task(self.server.handler(req, ex))
        watcher = asyncio.create_task(self._watch())
        try:
            await asyncio.wait({handler, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone = watcher.done()
            if not handler.done():  # the client left (or the server is being torn down)
                handler.cancel()
            watcher.cancel()
            await asyncio.gather(handler, watcher, return_exceptions=True)
        if gone or handler.cancelled():
            ex.status = ex.status or 499
            ex.log_extra += " client-gone"
            self.server.log_access(ex)
            return False
        err = handler.exception()
        if isinstance(err, (ClientGone, ConnectionError)):
            ex.log_extra += " client-gone"
            self.server.log_access(ex)
            return False
        if err is not None and not isinstance(err, APIError):
            log.error("handler failed on %s %s", req.method, req.path, exc_info=err)
            err = internal_error()
        if err is None and not ex.finished and not ex.started:
            log.error("handler for %s %s sent no response", req.method, req.path)
            err = internal_error()
        if err is not None:
            if ex.started:  # too late for a status: cut the response short
                self.server.log_access(ex)
                return False
            try:
                await ex.send_error(err)
            except ClientGone:
                return False
        self.server.log_access(ex)
        return ex.finished and not ex.close and not self.server.draining

    async def _linger(self, seconds: float = 2.0) -> None:
        """Half-close and drain what the client is still sending, so that closing does not reset
        the connection before the client has read our error response."""
        try:
            if self.writer.can_write_eof():
                self.writer.write_eof()
            loop = asyncio.get_running_loop()
            end = loop.time() + seconds
            while loop.time() < end and await self._fill(end - loop.time()):
                self.buf.clear()
        except (asyncio.TimeoutError, ConnectionError, OSError, RuntimeError):
            pass

    async def _close(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 5.0)
        except (asyncio.TimeoutError, ConnectionError, OSError):
            self.writer.transport.abort()
        except asyncio.CancelledError:
            self.writer.transport.abort()
            raise


class HttpServer:
    """Serves `handler` over HTTP/1.1. `shutdown` stops accepting, lets in-flight requests finish
    within a deadline, then calls `on_deadline` (to abort them cleanly) and closes everything."""

    def __init__(self, handler: Handler, limits: Limits | None = None, check_head: HeadCheck | None = None):
        self.handler = handler
        self.check_head = check_head
        self.limits = limits or Limits()
        self.connections: set[_Connection] = set()
        self.num_refusing = 0   # connections over the cap, being answered 503
        self.draining = False
        self._server: asyncio.base_events.Server | None = None

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._on_connect, host, port, backlog=1024)

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1]

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Connection(self, reader, writer)
        if self.draining:
            writer.close()
            return
        if len(self.connections) >= self.limits.max_connections:
            await self._refuse_connection(conn)
            return
        self.connections.add(conn)
        try:
            await conn.run()
        except asyncio.CancelledError:
            pass  # shutdown ends idle connections this way; asyncio's stream callback must not see it

    async def _refuse_connection(self, conn: _Connection) -> None:
        """Over the cap: answer 503 without reading the request, then close. Refusals are capped
        too; past that, a connection is dropped at once."""
        if self.num_refusing >= self.limits.max_connections:
            conn.writer.transport.abort()
            return
        self.num_refusing += 1
        try:
            err = APIError(503, "The server has too many open connections. Please retry shortly.",
                           type="server_error", headers=[("Retry-After", "1")], close=True)
            await conn._refuse(None, err, linger=1.0)
        except (ClientGone, ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self.num_refusing -= 1
            await conn._close()

    def num_busy(self) -> int:
        return sum(c.busy for c in self.connections)

    async def shutdown(self, timeout: float, on_deadline: Callable[[], None] | None = None) -> None:
        self.draining = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            if not conn.busy:
                conn.task.cancel()
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while self.num_busy() and loop.time() < end:
            await asyncio.sleep(0.05)
        if self.num_busy() and on_deadline is not None:
            log.warning("shutdown deadline reached; aborting %d in-flight request(s)", self.num_busy())
            on_deadline()
            end = loop.time() + 5.0
            while self.num_busy() and loop.time() < end:
                await asyncio.sleep(0.05)
        tasks = [c.task for c in self.connections]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def log_access(self, ex: Exchange) -> None:
        req = ex.req
        line = f"{req.method} {req.target} {req.version}" if req.method != "-" else "-"
        access_log.info('%s "%s" %s %d %.3fs%s', req.peer, line, ex.status or "-", ex.bytes_out,
                        time.monotonic() - ex.t0, ex.log_extra)
