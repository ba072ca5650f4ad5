"""Property-based fuzzing (hypothesis) of the HTTP parser and the OpenAI request validation, on a
real server over loopback.

What must hold on every input: no 500 for bad input, no crash and no hang (every request gets a
well-formed answer within a few seconds), and the server still answers a canary afterwards.
Examples are derandomized (the same inputs on every run, no example database), so a CI run tries a
fixed number of inputs: the sum of the `max_examples` below (FUZZ_EXAMPLES), in well under a minute
on a 2-core machine. LAMINA_FUZZ_SCALE=k tries k times as many (other inputs, as derandomization
follows the count), for a longer hunt.
"""
from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lamina.engine.errors import RequestError
from lamina.server.errors import APIError
from lamina.server.http import Limits
from tests.server.conftest import start_app
from tests.server.helpers import MODEL, Conn, http, request_bytes, sse_events

EXAMPLES = {"http": 300, "validation": 300, "chat": 120, "completions": 120}
FUZZ_EXAMPLES = sum(EXAMPLES.values())
SCALE = float(os.environ.get("LAMINA_FUZZ_SCALE", "1"))


def fuzz(name: str):
    return settings(max_examples=max(1, int(EXAMPLES[name] * SCALE)), derandomize=True, database=None,
                    deadline=None, suppress_health_check=list(HealthCheck), print_blob=False)


@pytest.fixture(scope="module")
def fuzz_server(server_loop, engine):
    """Short timeouts, so inputs that leave a request unfinished are answered (408) quickly."""
    srv = start_app(server_loop, engine, served_model_names=[MODEL], max_inflight_seqs=64,
                    limits=Limits(header_timeout=0.25, body_timeout=0.25, keep_alive_timeout=0.25))
    yield srv
    srv.stop()


def _canary(port: int) -> None:
    r = http(port, "GET", "/health", timeout=10)
    assert r.status == 200


def _final_canary(port: int) -> None:
    _canary(port)
    r = http(port, "POST", "/v1/completions", {"model": MODEL, "prompt": "One, two,", "max_tokens": 2}, timeout=60)
    assert r.status == 200 and r.json()["usage"]["completion_tokens"] == 2


# -- the HTTP head and body parser ---------------------------------------------------------------
def _chunked(body: bytes) -> bytes:
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


_COMPLETION = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 1}).encode()
BASES = [
    request_bytes("GET", "/health"),
    request_bytes("GET", "/v1/models"),
    request_bytes("HEAD", "/v1/models/" + MODEL),
    request_bytes("GET", "/metrics", version="HTTP/1.0"),
    request_bytes("POST", "/tokenize", b'{"prompt": "hello"}', {"Content-Type": "application/json"}),
    request_bytes("POST", "/v1/completions", _COMPLETION, {"Expect": "100-continue"}),
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + _chunked(_COMPLETION),
    request_bytes("POST", "/detokenize", b'{"tokens": [1, 2]}', {"Connection": "close"}),
]
SPECIAL = [b"\r\n", b"\n", b"\r", b"\r\n\r\n", b":", b" ", b"\t", b"\x00", b"\xff", "\u00b2".encode(),
           "\u0663".encode(), b"-1", b"99999999999999999999999", b"0x10", b";ext", b"HTTP/1.1", b"HTTP/2.0",
           b"Content-Length: 3\r\n", b"Content-Length: \xc2\xb2\r\n", b"Transfer-Encoding: chunked\r\n",
           b"Transfer-Encoding: gzip, chunked\r\n", b"Expect: 100-continue\r\n", b"Connection: close\r\n",
           b"Authorization: Bearer \xe2\x82\xac\r\n", b"0\r\n\r\n", b"ffffffffffffffff\r\n", b"/v1/../v1/models",
           b"%00", b"?a=b#c", b"*", b"GET ", b"POST "]


@st.composite
def mutated_requests(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["set", "insert", "special", "delete", "dup-line", "lf", "cr"]))
        i = draw(st.integers(0, len(data)))
        if kind == "set" and data:
            data[min(i, len(data) - 1)] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "special":
            data[i:i] = draw(st.sampled_from(SPECIAL))
        elif kind == "delete":
            del data[i:i + draw(st.integers(1, 8))]
        elif kind == "dup-line":
            start = data.rfind(b"\n", 0, i) + 1
            end = data.find(b"\n", i)
            end = len(data) if end < 0 else end + 1
            data[end:end] = data[start:end]
        elif kind == "lf":
            data = bytearray(bytes(data).replace(b"\r\n", b"\n", draw(st.integers(1, 3))))
        elif kind == "cr":
            data = bytearray(bytes(data).replace(b"\r\n", b"\r", 1))
    return bytes(data)


_token = st.text(st.sampled_from("ABCXYZabcxyz-_!#$%&'*+.^`|~0123456789"), min_size=0, max_size=12)
_header = st.tuples(st.one_of(_token, st.text(max_size=8)),
                    st.one_of(st.text(max_size=20), st.integers(-5, 2 ** 70).map(str)))


@st.composite
def generated_requests(draw) -> bytes:
    method = draw(st.one_of(st.sampled_from(["GET", "POST", "HEAD", "PUT", "OPTIONS"]), _token))
    target = draw(st.one_of(st.sampled_from(["/health", "/v1/models", "/tokenize", "/v1/completions", "*",
                                             "http://h/v1/models"]), st.text(max_size=20)))
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/1.2", "HTTP/2", "http/1.1", ""]))
    headers = draw(st.lists(_header, max_size=6))
    body = draw(st.one_of(st.just(b""), st.binary(max_size=40), st.sampled_from([_COMPLETION, b"{}"])))
    head = f"{method} {target} {version}".encode("utf-8", "surrogatepass")
    for name, value in headers:
        head += b"\r\n" + f"{name}: {value}".encode("utf-8", "surrogatepass")
    if draw(st.booleans()):
        head += b"\r\nContent-Length: %d" % len(body)
    return head + b"\r\n\r\n" + body


def _exchange(port: int, data: bytes):
    """Send raw bytes; the first final response (a 100 Continue is skipped), or None if the server
    closed without answering. A hang fails (socket timeout)."""
    c = Conn(port, timeout=15)
    head_request = data.lstrip(b"\r\n").startswith(b"HEAD ")   # its answer has no body to read
    try:
        c.send(data)
        while True:
            try:
                r = c.read_response(head_only=head_request)
            except EOFError:
                return None
            if r.status != 100:
                return r
    except (ConnectionResetError, BrokenPipeError):
        return None
    finally:
        c.close()


@fuzz("http")
@given(st.one_of(mutated_requests(), generated_requests(), st.binary(max_size=200).map(lambda b: b + b"\r\n\r\n")))
def test_fuzz_http_parser(fuzz_server, data):
    r = _exchange(fuzz_server.port, data)
    if r is None:  # only input that never starts a request may go unanswered
        assert not data.strip(b"\r\n") or data.lstrip(b"\r\n").startswith(b"\r"), data
    else:
        assert r.status < 500 or r.status in (501, 503, 505), (data, r.status, r.body)
        if r.status >= 400 and r.body:
            assert set(json.loads(r.body)["error"]) == {"message", "type", "param", "code"}
    _canary(fuzz_server.port)


def test_fuzz_http_canary(fuzz_server):
    _final_canary(fuzz_server.port)


# -- OpenAI request validation -------------------------------------------------------------------
# Bodies that are mostly valid, with any field (often one, sometimes several) replaced by a value of
# a random type or out of range, so that every check is reached, not only the first.
_scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 70), 2 ** 70),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
_any = st.recursive(_scalar, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                          max_size=4),
                    max_leaves=8)


def mostly(valid, invalid=_any, one_in: int = 6):
    """`valid`, except one time in `one_in`: `invalid`."""
    return st.integers(1, one_in).flatmap(lambda i: invalid if i == 1 else valid)


_small_int = st.integers(-3, 3)
# text, sometimes with lone surrogates (valid JSON escapes, not UTF-8) and control characters
_text = mostly(st.text(max_size=24), st.text(st.characters(categories=["Cs", "Cc", "Ll", "Zs", "So"]), max_size=8))
_ids = st.lists(st.integers(0, 49151), min_size=1, max_size=12)
_bad_ids = st.lists(st.integers(-3, 2 ** 40), max_size=12)
# max_tokens never asks for a long generation: 1-3 tokens, or a bad value
_max_tokens = mostly(st.integers(1, 3), st.one_of(_small_int, st.integers(10 ** 6, 2 ** 70), st.floats(-5, 5),
                                                  st.text(max_size=4), st.booleans(), st.lists(_small_int, max_size=2)))

SAMPLING = {
    "temperature": mostly(st.floats(0, 2)),
    "top_p": mostly(st.floats(0, 1)),
    "top_k": mostly(st.one_of(st.integers(-1, 60000), st.just(2 ** 31 - 1)), st.integers(2 ** 31, 2 ** 70)),
    "min_p": mostly(st.floats(0, 1)),
    "n": mostly(st.integers(1, 8), st.one_of(st.integers(-1, 0), st.integers(9, 200), _any)),
    "seed": mostly(st.integers(-(2 ** 63), 2 ** 63 - 1), st.one_of(st.integers(2 ** 63, 2 ** 70), _any)),
    "presence_penalty": mostly(st.floats(-2, 2)),
    "frequency_penalty": mostly(st.floats(-2, 2)),
    "repetition_penalty": mostly(st.floats(0.01, 100)),
    "logit_bias": mostly(st.dictionaries(st.integers(0, 49151).map(str), st.floats(-100, 100), max_size=4),
                         st.one_of(st.dictionaries(st.one_of(st.integers(-3, 2 ** 40).map(str), _text),
                                                   st.one_of(st.floats(-200, 200), _any), max_size=4), _any)),
    "stop": mostly(st.one_of(_text, st.lists(_text, max_size=4)),
                   st.one_of(st.lists(_text, min_size=5, max_size=8), st.text(min_size=257, max_size=400), _any)),
    "stop_token_ids": mostly(st.lists(st.integers(0, 49151), max_size=4), st.one_of(_bad_ids, _any)),
    "min_tokens": mostly(st.integers(0, 1), st.one_of(st.integers(2, 2 ** 70), _any)),
    "ignore_eos": mostly(st.booleans()),
    "include_stop_str_in_output": mostly(st.booleans()),
    "skip_special_tokens": mostly(st.booleans()),
    "stream": mostly(st.booleans()),
    "stream_options": mostly(st.fixed_dictionaries({}, optional={"include_usage": mostly(st.booleans())})),
    "user": _any,
    "unknown_field": _any,
}
_part = mostly(st.fixed_dictionaries({"type": st.just("text"), "text": _text}),
               st.fixed_dictionaries({"type": st.one_of(st.sampled_from(["image_url", "input_audio"]), _any)},
                                     optional={"text": _any}))
_message = mostly(st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user", "assistant"]),
                                         "content": st.one_of(_text, st.lists(_part, min_size=1, max_size=3))},
                                        optional={"name": _any}),
                  st.fixed_dictionaries({"role": mostly(st.sampled_from(["tool", "function", "x"])),
                                         "content": _any}, optional={"tool_calls": _any}))
CHAT = {**SAMPLING,
        "max_completion_tokens": _max_tokens,
        "logprobs": mostly(st.booleans()),
        "top_logprobs": mostly(st.integers(0, 20), st.one_of(st.integers(21, 2 ** 40), st.integers(-5, -1), _any)),
        "tools": _any, "tool_choice": mostly(st.sampled_from(["none", "auto"])),
        "response_format": mostly(st.just({"type": "text"})), "audio": _any, "modalities": mostly(st.just(["text"]), st.one_of(st.lists(_any, max_size=2), _any))}
COMPLETIONS = {**SAMPLING,
               "logprobs": mostly(st.integers(0, 5), st.one_of(st.integers(21, 2 ** 40), st.integers(-5, -1), _any)),
               "echo": mostly(st.booleans()),
               "best_of": _any,
               "suffix": _any}
_prompt = mostly(st.one_of(_text.filter(bool), st.lists(_text.filter(bool), min_size=1, max_size=3), _ids,
                           st.lists(_ids, min_size=1, max_size=3)),
                 st.one_of(_bad_ids, st.lists(_bad_ids, max_size=3), st.just(""), st.just([]), _any))


def _bodies(required: dict, fields: dict):
    """Required fields plus a random few of the optional ones."""
    names = sorted(fields)
    return st.builds(lambda req, chosen, values: {**req, **{k: values[k] for k in chosen}},
                     st.fixed_dictionaries(required),
                     st.lists(st.sampled_from(names), max_size=6, unique=True),
                     st.fixed_dictionaries(fields))


chat_bodies = _bodies({"model": mostly(st.just(MODEL), one_in=12), "max_tokens": _max_tokens,
                       "messages": mostly(st.lists(_message, min_size=1, max_size=3))}, CHAT)
completion_bodies = _bodies({"model": mostly(st.just(MODEL), one_in=12), "max_tokens": _max_tokens, "prompt": _prompt},
                            COMPLETIONS)


@fuzz("validation")
@given(st.one_of(chat_bodies.map(lambda b: ("chat", b)), completion_bodies.map(lambda b: ("completion", b))))
def test_fuzz_validation_in_process(fuzz_server, case):
    """Parsing, tokenizing and checking a request (everything before the engine runs it) either
    accepts it or raises a 4xx error naming the problem; nothing else escapes."""
    from lamina.server.generate import parse_request
    kind, body = case
    try:
        gen, prompts = parse_request(fuzz_server.app, kind, json.dumps(body).encode())
    except APIError as e:
        assert 400 <= e.status < 500 and e.message
    except RequestError as e:
        assert e.message
    else:
        assert prompts and all(p.token_ids for p in prompts)


def _check_answer(port: int, path: str, body: dict) -> None:
    r = http(port, "POST", path, body, timeout=60)
    assert r.status < 500, (body, r.status, r.body)
    if r.status == 200 and body.get("stream") is True:
        events = sse_events(r.body)
        assert not any(isinstance(e, dict) and "error" in e for e in events), events
    elif r.status == 200:
        assert r.json()["choices"]
    else:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]


@fuzz("chat")
@given(chat_bodies)
def test_fuzz_chat_completions(fuzz_server, body):
    _check_answer(fuzz_server.port, "/v1/chat/completions", body)
    _canary(fuzz_server.port)


@fuzz("completions")
@given(completion_bodies)
def test_fuzz_completions(fuzz_server, body):
    _check_answer(fuzz_server.port, "/v1/completions", body)
    _canary(fuzz_server.port)


def test_fuzz_validation_canary(fuzz_server):
    _final_canary(fuzz_server.port)


def test_fuzz_examples_are_stated_in_the_readme():
    readme = open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md")).read()
    assert f"{FUZZ_EXAMPLES} " in readme and "fuzz" in readme
