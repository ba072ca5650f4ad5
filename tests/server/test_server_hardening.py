"""The real server against requests meant to hurt it: CPU-heavy bodies that must not freeze the
event loop, keys checked before bodies are read, and nothing internal in what a client sees."""
from __future__ import annotations

import json
import os
import threading
import time

import pytest

from lamina.engine.errors import EngineDeadError
from tests.server.conftest import start_app
from tests.server.helpers import MODEL, Conn, Proxy, http, request_bytes, sse_events

MSGS = [{"role": "user", "content": "Hi"}]
BIG_TEXT = "hello world, this is some text. " * ((3 << 20) // 32)   # 3 MiB: seconds of tokenizing


def _health_during(port: int, path: str, body: dict) -> tuple[int, int]:
    """Send a CPU-heavy request and poll /health until it is answered. Returns how many /health
    answers arrived while the heavy request was still being handled, and the heavy one's status."""
    done = threading.Event()
    status = []

    def heavy():
        status.append(http(port, "POST", path, body, timeout=120).status)
        done.set()

    t = threading.Thread(target=heavy)
    t.start()
    time.sleep(0.5)   # the body (3 MiB over loopback) is in; the handler is working on it
    answered = 0
    while not done.is_set():
        r = http(port, "GET", "/health", timeout=120)
        assert r.status == 200
        answered += not done.is_set()
        time.sleep(0.05)
    t.join(120)
    return answered, status[0]


@pytest.mark.parametrize("path, body", [
    ("/tokenize", {"model": MODEL, "prompt": BIG_TEXT}),
    ("/v1/completions", {"model": MODEL, "prompt": BIG_TEXT, "max_tokens": 1}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": BIG_TEXT}]}),
])
def test_cpu_heavy_handlers_leave_the_event_loop_free(server, path, body):
    """An 8 MiB /tokenize froze /health for 12 s: tokenizing ran on the event loop (and on a worker
    thread, the tokenizer's encode() would still hold the GIL). Tokenizing 3 MiB takes seconds
    here: /health must answer many times before it ends, not once, right after it."""
    answered, status = _health_during(server.port, path, body)
    assert status in (200, 400)  # the long prompts exceed the context: 400 after tokenizing them
    assert answered >= 10, answered


# -- API keys ------------------------------------------------------------------------------------
def test_api_key_checked_before_the_body(make_server):
    srv = make_server(api_keys=("sekrit",))
    for expect in (True, False):
        c = Conn(srv.port, timeout=5)
        t0 = time.monotonic()
        c.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n"
               b"Content-Type: application/json\r\nContent-Length: 30000000\r\n"
               + (b"Expect: 100-continue\r\n" if expect else b"") + b"\r\n")
        r = c.read_response()
        assert r.status == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert time.monotonic() - t0 < 2
        c.close()
    # the right key still gets its 100 Continue, and /health stays public
    c = Conn(srv.port)
    body = json.dumps({"model": MODEL, "messages": MSGS, "max_tokens": 1}).encode()
    c.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sekrit\r\n"
           b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % len(body))
    assert c.read_response(head_only=True).status == 100
    c.send(body)
    assert c.read_response().status == 200
    c.close()
    assert http(srv.port, "GET", "/health").status == 200


def test_non_ascii_api_key(make_server):
    key = "cl\u00e9-\u20ac-\U0001f511"
    srv = make_server(api_keys=(key,))
    for sent, status in [(key.encode("utf-8"), 200), ("cl\u00e9-\u20ac-x".encode("utf-8"), 401),
                         (key.encode("utf-8")[:-1], 401), (b"", 401)]:
        c = Conn(srv.port)
        c.send(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + sent + b"\r\n\r\n")
        assert c.read_response().status == status, sent
        c.close()


def test_empty_api_key_is_an_error(monkeypatch, capsys):
    from lamina.cli import build_parser
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["serve", "--api-key", ""])
    assert e.value.code == 2 and "api-key" in capsys.readouterr().err
    from lamina.server.launch import settings_from_args
    args = build_parser().parse_args(["serve"])
    monkeypatch.setenv("LAMINA_API_KEY", "")
    with pytest.raises(ValueError, match="LAMINA_API_KEY"):
        settings_from_args(args, Proxy(None, model=MODEL, max_num_seqs=4))
    monkeypatch.setenv("LAMINA_API_KEY", "k")
    assert settings_from_args(args, Proxy(None, model=MODEL, max_num_seqs=4)).api_keys == ("k",)


# -- nothing internal leaks ----------------------------------------------------------------------
def test_models_show_no_filesystem_path(server, default_model_dir):
    for path in ("/v1/models", "/v1/models/" + MODEL):
        r = http(server.port, "GET", path)
        assert r.status == 200
        assert default_model_dir not in r.body.decode() and os.path.expanduser("~") not in r.body.decode()
    cards = http(server.port, "GET", "/v1/models").json()["data"]
    assert all(card["root"] == MODEL for card in cards)


def test_no_exception_text_in_500s(make_server, engine):
    secret = "/home/secret/weights.safetensors"

    async def failing_generate(*args, **kwargs):
        raise RuntimeError(f"cannot read {secret}")
        yield  # an async generator, as the engine's is

    srv = make_server(engine=Proxy(engine, generate=failing_generate))
    body = {"model": MODEL, "messages": MSGS, "max_tokens": 2}
    r = http(srv.port, "POST", "/v1/chat/completions", body)
    assert r.status == 500 and secret not in r.body.decode() and r.json()["error"]["message"]
    r = http(srv.port, "POST", "/v1/chat/completions", {**body, "stream": True})
    events = sse_events(r.body)
    assert "error" in events[-2] and secret not in r.body.decode()

    async def dead_generate(*args, **kwargs):
        raise EngineDeadError(f"the engine failed: {secret}")
        yield

    srv = make_server(engine=Proxy(engine, generate=dead_generate))
    r = http(srv.port, "POST", "/v1/chat/completions", body)
    assert r.status >= 500 and secret not in r.body.decode()


def test_no_exception_text_in_health(server_loop):
    secret = "/home/secret/model"

    def factory():
        raise RuntimeError(f"no config.json in {secret}")

    srv = start_app(server_loop, engine_factory=factory)
    try:
        srv.loop.run(srv.app.loaded.wait())
        for path in ("/health", "/v1/models"):
            r = http(srv.port, "GET", path)
            assert r.status == 503 and secret not in r.body.decode() and r.json()["error"]["message"]
    finally:
        srv.stop()


def test_chat_template_errors_name_the_problem_without_internals(make_server, engine):
    """A template's own refusal (raise_exception) is the client's business; any other failure is not."""
    from lamina.tokenizer import ChatTemplateError

    class Tok(Proxy):
        def apply_chat_template(self, messages, **kw):
            if messages[0]["content"] == "refuse":
                raise ChatTemplateError("Conversation roles must alternate")
            raise KeyError("/internal/template/path")

    srv = make_server(engine=Proxy(engine, tokenizer=Tok(engine.tokenizer)))
    r = http(srv.port, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "refuse"}]})
    assert r.status == 400 and "roles must alternate" in r.json()["error"]["message"]
    r = http(srv.port, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})
    assert r.status == 500 and "/internal" not in r.body.decode()
    assert http(srv.port, "POST", "/tokenize", {"messages": [{"role": "user", "content": "x"}]}).status == 500
