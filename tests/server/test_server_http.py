"""The HTTP/1.1 layer on its own, against a trivial handler (no model): parsing, framing, limits."""
from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest

from lamina.server.errors import APIError
from lamina.server.http import HttpServer, Limits, parse_head
from tests.server.helpers import Conn, request_bytes


async def _handler(req, ex):
    """/echo returns what it got; /stream sends three pieces with a pause; /fail raises."""
    if req.path == "/echo":
        await ex.send_json(200, {"method": req.method, "path": req.path, "query": req.query,
                                 "body": req.body.decode("latin-1"), "headers": req.headers})
    elif req.path == "/stream":
        await ex.start_stream()
        for i in range(3):
            await ex.write(f"data: {i}\n\n".encode())
            await asyncio.sleep(0.2)
        await ex.write(b"data: [DONE]\n\n")
        await ex.end_stream()
    elif req.path == "/bad":
        raise APIError(400, "nope", param="x")
    elif req.path == "/fail":
        raise RuntimeError("a bug")
    else:
        raise APIError(404, "not here")


@pytest.fixture(scope="module")
def trivial(server_loop):
    limits = Limits(max_header_bytes=4096, max_body_bytes=1 << 20, keep_alive_timeout=1.0, header_timeout=1.0,
                    body_timeout=1.0)
    srv = HttpServer(_handler, limits)
    server_loop.run(srv.start("127.0.0.1", 0))
    yield srv
    server_loop.run(srv.shutdown(1.0))


def _one(port, data: bytes):
    c = Conn(port, timeout=10)
    try:
        c.send(data)
        return c.read_response(), c
    except Exception:
        c.close()
        raise


def test_parse_head_basics():
    lim = Limits()
    req = parse_head(b"POST /v1/x?a=1 HTTP/1.1\r\nHost: h\r\nX-A: 1\r\nx-a: 2\r\nConnection: close", lim)
    assert (req.method, req.path, req.query, req.version) == ("POST", "/v1/x", "a=1", "HTTP/1.1")
    assert req.headers["x-a"] == "1, 2" and not req.keep_alive
    assert parse_head(b"GET / HTTP/1.0", lim).keep_alive is False
    assert parse_head(b"GET / HTTP/1.0\r\nConnection: keep-alive", lim).keep_alive is True
    assert parse_head(b"GET http://h:1/p?q HTTP/1.1", lim).path == "/p"
    for bad in [b"GARBAGE", b"GET /", b"GET / HTTP/1.1 extra", b"G(T / HTTP/1.1", b"GET / HTTX/1.1",
                b"GET nopath HTTP/1.1", b"GET / HTTP/1.1\r\nBad Header: x", b"GET / HTTP/1.1\r\n folded",
                b"GET / HTTP/1.1\r\nX: a\x00b", b"GET /\x01 HTTP/1.1"]:
        with pytest.raises(APIError) as e:
            parse_head(bad, lim)
        assert e.value.status == 400, bad
    with pytest.raises(APIError) as e:
        parse_head(b"GET / HTTP/2.0", lim)
    assert e.value.status == 505
    with pytest.raises(APIError) as e:
        parse_head(b"GET / HTTP/1.1" + b"\r\nX: y" * 101, lim)
    assert e.value.status == 431


def test_keep_alive_and_pipelining(trivial):
    c = Conn(trivial.port)
    body = b'{"x": 1}'
    # two requests in one write: answered in order on the same connection
    c.send(request_bytes("POST", "/echo", body) + request_bytes("GET", "/echo?q=2"))
    r1, r2 = c.read_response(), c.read_response()
    assert r1.status == 200 and r1.json()["body"] == '{"x": 1}' and r1.headers["connection"] == "keep-alive"
    assert r2.json()["query"] == "q=2"
    c.send(request_bytes("GET", "/echo", headers={"Connection": "close"}))
    r3 = c.read_response()
    assert r3.headers["connection"] == "close" and c.closed_by_server(2)


def test_http10_and_head(trivial):
    r, c = _one(trivial.port, b"GET /echo HTTP/1.0\r\n\r\n")
    assert r.status == 200 and r.headers["connection"] == "close" and c.closed_by_server(2)
    c.close()
    r, c = _one(trivial.port, b"GET /stream HTTP/1.0\r\n\r\n")  # no chunked on 1.0: close-delimited
    assert not r.chunked and "content-length" not in r.headers and r.body.endswith(b"data: [DONE]\n\n")
    c.close()
    c = Conn(trivial.port)
    c.send(request_bytes("HEAD", "/echo"))
    r = c.read_response(head_only=True)
    assert r.status == 200 and int(r.headers["content-length"]) > 0
    c.send(request_bytes("GET", "/echo"))  # nothing of the HEAD's body was sent: the next reply parses
    assert c.read_response().json()["method"] == "GET"
    c.close()


def test_chunked_request_body_and_expect_continue(trivial):
    c = Conn(trivial.port)
    c.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\n")
    assert c.read_response().json()["body"] == "hello world"
    c.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
    interim = c.read_response(head_only=True)
    assert interim.status == 100
    c.send(b"abc")
    assert c.read_response().json()["body"] == "abc"
    c.close()


@pytest.mark.parametrize("data, status", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40 + b"\r\n\r\n", 400),  # a TLS hello
    (b"GET / HTTP/1.1\r\nContent-Length: abc\r\n\r\n", 400),
    (b"POST /echo HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
    (b"POST /echo HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"POST /echo HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    (b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    (b"POST /echo HTTP/1.1\r\nExpect: something\r\nContent-Length: 1\r\n\r\nx", 417),
    (b"GET / HTTP/3.0\r\n\r\n", 505),
])
def test_malformed_requests_get_4xx_and_close(trivial, data, status):
    r, c = _one(trivial.port, data)
    assert r.status == status
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert r.headers["connection"] == "close" and c.closed_by_server(3)
    c.close()
    assert _one(trivial.port, request_bytes("GET", "/echo"))[0].status == 200  # still serving


def test_oversized_headers_431(trivial):
    r, c = _one(trivial.port, b"GET /echo HTTP/1.1\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n")
    assert r.status == 431 and r.json()["error"]["message"]
    c.close()
    # headers that never end count too: the limit is hit before the blank line arrives
    c = Conn(trivial.port)
    c.send(b"GET /echo HTTP/1.1\r\n" + b"X-A: b\r\n" * 700)
    assert c.read_response().status == 431
    c.close()


def test_huge_content_length_413_at_once(trivial):
    c = Conn(trivial.port, timeout=5)
    t0 = time.monotonic()
    c.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10000000000\r\n\r\n{")
    r = c.read_response()
    assert r.status == 413 and time.monotonic() - t0 < 2.0
    assert "too large" in r.json()["error"]["message"]
    c.close()
    # a chunked body over the limit is cut off as soon as it passes it
    c = Conn(trivial.port, timeout=5)
    c.send(b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + b"100000\r\n" + b"x" * (1 << 20) + b"\r\n"
           + b"10\r\n" + b"y" * 16 + b"\r\n")
    assert c.read_response().status == 413
    c.close()


def test_slow_and_idle_clients_are_cut_off(trivial):
    idle = Conn(trivial.port)                       # says nothing: closed after keep_alive_timeout
    slow = Conn(trivial.port)
    slow.send(b"GET /echo HTTP/1.1\r\nHost: x\r\n")  # never finishes its headers: 408
    body = Conn(trivial.port)
    body.send(b"POST /echo HTTP/1.1\r\nContent-Length: 100\r\n\r\nonly a bit")  # never finishes its body: 408
    t0 = time.monotonic()
    assert idle.closed_by_server(5)
    assert slow.read_response().status == 408
    assert body.read_response().status == 408
    assert time.monotonic() - t0 < 4
    for c in (idle, slow, body):
        c.close()


def test_client_vanishing_mid_body_leaves_server_fine(trivial):
    for _ in range(5):
        c = Conn(trivial.port)
        c.send(b"POST /echo HTTP/1.1\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        c.close()  # reset
    assert _one(trivial.port, request_bytes("GET", "/echo"))[0].status == 200


def test_streaming_is_chunked_and_flushed(trivial):
    c = Conn(trivial.port)
    c.send(request_bytes("GET", "/stream"))
    c.sock.settimeout(5)
    t0 = time.monotonic()
    first = b""
    while b"data: 0" not in first:
        first += c.sock.recv(4096)
    assert time.monotonic() - t0 < 0.15, "the first event must not wait for the rest"
    c.buf = first
    r = c.read_response()
    assert r.chunked and r.headers["content-type"] == "text/event-stream"
    assert r.body == b"data: 0\n\ndata: 1\n\ndata: 2\n\ndata: [DONE]\n\n"
    c.send(request_bytes("GET", "/echo"))  # keep-alive after a stream
    assert c.read_response().status == 200
    c.close()


def test_handler_errors_become_envelopes(trivial):
    r, c = _one(trivial.port, request_bytes("GET", "/bad"))
    assert r.status == 400 and r.json() == {"error": {"message": "nope", "type": "invalid_request_error",
                                                      "param": "x", "code": None}}
    c.close()
    r, c = _one(trivial.port, request_bytes("GET", "/fail"))
    assert r.status == 500 and r.headers["x-should-retry"] == "false"
    assert r.json()["error"]["type"] == "server_error"
    c.close()


def test_json_content_type_and_length(trivial):
    r, c = _one(trivial.port, request_bytes("POST", "/echo", b"{}"))
    assert r.headers["content-type"] == "application/json"
    assert int(r.headers["content-length"]) == len(r.body)
    json.loads(r.body)
    c.close()


# -- hardening (issue 15) ------------------------------------------------------------------------
@pytest.mark.parametrize("value", [b"\xb2", b"1\xb3", b"\xb9", "\u0663".encode(), b"+5", b" 5 5", b"0x10", b"1_0"])
def test_content_length_must_be_ascii_digits(trivial, value):
    """'\xb2' is '²' in latin-1, which passes str.isdigit(); int() then raised inside the handler,
    which answered nothing at all."""
    r, c = _one(trivial.port, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: " + value
                + b"\r\n\r\nabcde")
    assert r.status == 400 and "Content-Length" in r.json()["error"]["message"]
    c.close()
    assert _one(trivial.port, request_bytes("GET", "/echo"))[0].status == 200


@pytest.mark.parametrize("body", [
    b"5\nhello\r\n0\r\n\r\n",          # size line ended by a bare LF
    b"5\r\nhello\n0\r\n\r\n",          # chunk data ended by a bare LF
    b"5\r\nhello\r\n0\n\r\n",          # last-chunk line ended by a bare LF
    b"5\r\nhello\r\n0\r\n\n",          # final blank line a bare LF
    b"5\r\nhello\r\n0\r\nX: y\n\r\n",  # a trailer line ended by a bare LF
    b"5\r\nhello\rX0\r\n\r\n",         # a lone CR
])
def test_chunked_framing_accepts_only_crlf(trivial, body):
    r, c = _one(trivial.port, b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
    assert r.status == 400 and r.headers["connection"] == "close"
    c.close()


def test_blank_lines_do_not_extend_keep_alive(trivial):
    """keep_alive_timeout is 1 s: a client that sends only CRLFs is closed after it, however often
    it sends them."""
    c = Conn(trivial.port)
    t0 = time.monotonic()
    closed_at = None
    while time.monotonic() - t0 < 4:
        try:
            c.send(b"\r\n")
        except OSError:
            closed_at = time.monotonic() - t0
            break
        c.sock.settimeout(0.25)
        try:
            if c.sock.recv(1) == b"":
                closed_at = time.monotonic() - t0
                break
        except socket.timeout:
            pass
        except OSError:
            closed_at = time.monotonic() - t0
            break
    c.close()
    assert closed_at is not None and closed_at < 2.5, closed_at


def test_whole_body_deadline(trivial):
    """body_timeout is 1 s for the whole body: a client trickling one byte at a time does not
    keep a connection (and its buffer) for ever."""
    c = Conn(trivial.port)
    c.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
    t0 = time.monotonic()
    c.sock.settimeout(0.2)
    got = b""
    while time.monotonic() - t0 < 5 and b"\r\n\r\n" not in got:
        try:
            c.sock.send(b"x")
            got += c.sock.recv(4096)
        except socket.timeout:
            continue
        except OSError:
            break
    elapsed = time.monotonic() - t0
    assert got.startswith(b"HTTP/1.1 408"), got
    assert elapsed < 2.5
    c.close()


def test_open_connections_are_capped(server_loop):
    srv = HttpServer(_handler, Limits(max_connections=3, keep_alive_timeout=5.0))
    server_loop.run(srv.start("127.0.0.1", 0))
    try:
        held = [Conn(srv.port) for _ in range(3)]
        for c in held:  # all three are really in use
            c.send(request_bytes("GET", "/echo"))
            assert c.read_response().status == 200
        extra = Conn(srv.port, timeout=5)
        extra.send(request_bytes("GET", "/echo"))
        r = extra.read_response()
        assert r.status == 503 and r.headers["connection"] == "close" and "retry-after" in r.headers
        assert r.json()["error"]["message"]
        assert extra.closed_by_server(3)
        extra.close()
        held.pop().close()
        deadline = time.monotonic() + 5
        while len(srv.connections) >= 3:  # the server notices the close
            assert time.monotonic() < deadline
            time.sleep(0.02)
        c = Conn(srv.port)
        c.send(request_bytes("GET", "/echo"))
        assert c.read_response().status == 200
        for c in held + [c]:
            c.close()
    finally:
        server_loop.run(srv.shutdown(1.0))


def test_head_check_runs_before_the_body_and_100_continue(server_loop):
    """A handler's `check_head` (the API key) refuses a request from its head: no 100 Continue,
    no waiting for (or buffering) a body the client may never send."""
    seen = []

    def check_head(req):
        seen.append(req.path)
        if req.header("authorization") != "Bearer k":
            raise APIError(401, "bad key", code="invalid_api_key")

    srv = HttpServer(_handler, Limits(body_timeout=30.0), check_head=check_head)
    server_loop.run(srv.start("127.0.0.1", 0))
    try:
        for expect in (True, False):
            c = Conn(srv.port, timeout=5)
            t0 = time.monotonic()
            c.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n"
                   + (b"Expect: 100-continue\r\n" if expect else b"") + b"\r\n")
            r = c.read_response()
            assert r.status == 401 and time.monotonic() - t0 < 2 and r.headers["connection"] == "close"
            c.close()
        c = Conn(srv.port, timeout=5)
        c.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\nContent-Length: 2\r\n"
               b"Expect: 100-continue\r\n\r\n")
        assert c.read_response(head_only=True).status == 100
        c.send(b"ok")
        assert c.read_response().json()["body"] == "ok"
        c.close()
    finally:
        server_loop.run(srv.shutdown(1.0))
