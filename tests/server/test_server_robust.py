"""The real server over raw sockets: bad input, limits, slow and vanishing clients, concurrency,
queue bound, auth, health, metrics and shutdown."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from openai import OpenAI

from tests.server.conftest import start_app
from tests.server.helpers import MODEL, Conn, http, metric, metrics, request_bytes, sse_events, wait_idle

MSGS = [{"role": "user", "content": "Tell me a long story about a dragon."}]


def _chat(max_tokens=8, stream=False, **extra):
    return {"model": MODEL, "messages": MSGS, "max_tokens": max_tokens, "stream": stream, **extra}


def _reset(c: Conn):
    """Close abruptly (RST), as a crashed client would."""
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    c.close()


def test_garbage_never_kills_the_server(server):
    for data in [b"GARBAGE\r\n\r\n", b"\x00\xff" * 50 + b"\r\n\r\n", b"GET\r\n\r\n", b"POST / HTTP/1.1\r\n:\r\n\r\n",
                 b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n"]:
        c = Conn(server.port, timeout=10)
        c.send(data)
        r = c.read_response()
        assert r.status == 400 and r.json()["error"]["type"] == "invalid_request_error"
        c.close()
    assert http(server.port, "GET", "/health").status == 200


def test_unknown_routes_and_methods(server):
    for prefix in ("", "/v1"):
        r = http(server.port, "GET", prefix + "/nope")
        assert r.status == 404 and r.json()["error"]["message"]
        r = http(server.port, "GET", prefix + "/chat/completions")
        assert r.status == 405 and r.headers["allow"] == "POST" and r.json()["error"]["code"] == "method_not_allowed"
        r = http(server.port, "DELETE", prefix + "/models")
        assert r.status == 405 and "GET" in r.headers["allow"]
    assert http(server.port, "GET", "/v1/models/").status == 200  # a trailing slash is fine
    assert http(server.port, "PUT", "/health").status == 405


def test_limits_on_the_real_server(server):
    c = Conn(server.port, timeout=10)
    c.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Huge: " + b"a" * 20000 + b"\r\n\r\n")
    assert c.read_response().status == 431
    c.close()
    c = Conn(server.port, timeout=10)
    t0 = time.monotonic()
    c.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Content-Length: 10737418240\r\n\r\n")
    r = c.read_response()
    assert r.status == 413 and time.monotonic() - t0 < 1.0 and r.headers["connection"] == "close"
    assert r.json()["error"]["message"].startswith("request body too large")
    c.close()


def test_idle_half_open_connections_do_not_block_service(server, make_server):
    idle = []
    for i in range(20):
        c = Conn(server.port)
        if i % 2:
            c.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Le")  # half a request
        idle.append(c)
    t0 = time.monotonic()
    r = http(server.port, "POST", "/v1/chat/completions", _chat(max_tokens=4))
    assert r.status == 200 and r.json()["usage"]["completion_tokens"] == 4
    assert time.monotonic() - t0 < 10
    assert http(server.port, "GET", "/health").status == 200
    for c in idle:
        c.close()
    # and with short timeouts they are cut off: silent ones closed, half-sent ones answered 408
    quick = make_server(limits={"keep_alive_timeout": 0.5, "header_timeout": 0.5})
    silent, partial = Conn(quick.port), Conn(quick.port)
    partial.send(b"GET /health HTTP/1.1\r\nHo")
    assert silent.closed_by_server(3)
    assert partial.read_response().status == 408
    silent.close()
    partial.close()


def test_client_vanishing_mid_body(server):
    before = metrics(server.port)
    for _ in range(3):
        c = Conn(server.port)
        c.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{\"model\": ")
        _reset(c)
    m = wait_idle(server.port)
    assert metric(m, "lamina:prompt_tokens_total") == metric(before, "lamina:prompt_tokens_total")
    assert http(server.port, "POST", "/chat/completions", _chat(max_tokens=2)).status == 200


@pytest.mark.parametrize("how", ["close", "reset"])
def test_client_vanishing_mid_stream_aborts(server, how):
    wait_idle(server.port)
    aborted = metric(metrics(server.port), "lamina:request_success_total", finished_reason="abort")
    c = Conn(server.port)
    c.send(request_bytes("POST", "/v1/chat/completions",
                         json.dumps(_chat(max_tokens=400, stream=True, ignore_eos=True)).encode()))
    got = b""
    while got.count(b"data: ") < 4:  # role chunk and a few tokens
        got += c.sock.recv(4096)
    (_reset if how == "reset" else Conn.close)(c)
    t0 = time.monotonic()
    m = wait_idle(server.port, timeout=10)
    assert time.monotonic() - t0 < 5, "400 tokens would take far longer: the request was aborted"
    assert metric(m, "lamina:request_success_total", finished_reason="abort") == aborted + 1
    assert not server.app.active_requests and server.app.inflight == 0


def test_client_vanishing_during_non_streaming_request_aborts(server):
    wait_idle(server.port)
    c = Conn(server.port)
    c.send(request_bytes("POST", "/chat/completions", json.dumps(_chat(max_tokens=400, ignore_eos=True)).encode()))
    deadline = time.monotonic() + 10
    while metric(metrics(server.port), "lamina:num_requests_running") == 0:  # wait until it really runs
        assert time.monotonic() < deadline
        time.sleep(0.05)
    c.close()
    t0 = time.monotonic()
    wait_idle(server.port, timeout=10)
    assert time.monotonic() - t0 < 5
    assert server.app.inflight == 0


def test_32_concurrent_streams(server):
    wait_idle(server.port)

    def one(i):
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"Say a number bigger than {i}."}],
                "max_tokens": 6, "stream": True, "temperature": 0.5, "seed": i,
                "stream_options": {"include_usage": True}}
        return http(server.port, "POST", "/v1/chat/completions", body, timeout=120)

    t0 = time.monotonic()
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    elapsed = time.monotonic() - t0
    ids = set()
    for r in results:
        assert r.status == 200 and r.chunked
        events = sse_events(r.body)[:-1]
        ids.add(events[0]["id"])
        assert events[0]["choices"][0]["delta"]["role"] == "assistant"
        assert [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"][0]["finish_reason"]] == \
            [events[-2]["choices"][0]["finish_reason"]]
        assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] <= 6
    assert len(ids) == 32
    wait_idle(server.port)
    assert elapsed < 60


def test_queue_bound_429_with_retry_after(make_server):
    srv = make_server(max_inflight_seqs=1)
    first = Conn(srv.port)
    first.send(request_bytes("POST", "/chat/completions",
                             json.dumps(_chat(max_tokens=60, stream=True, ignore_eos=True)).encode()))
    head = first.read_response(head_only=True)
    assert head.status == 200
    r = http(srv.port, "POST", "/chat/completions", _chat(max_tokens=2))
    assert r.status == 429 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    first.close()
    deadline = time.monotonic() + 10
    while srv.app.inflight:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert http(srv.port, "POST", "/chat/completions", _chat(max_tokens=2)).status == 200


def test_api_key(make_server):
    srv = make_server(api_keys=("sekrit",))
    good = {"Authorization": "Bearer sekrit"}
    for path in ("/v1/models", "/models", "/metrics", "/nope"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"}):
            r = http(srv.port, "GET", path, headers=headers)
            assert r.status == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, headers)
    assert http(srv.port, "GET", "/health").status == 200  # public
    assert http(srv.port, "GET", "/v1/models", headers=good).status == 200
    assert http(srv.port, "GET", "/metrics", headers=good).status == 200
    with pytest.raises(openai.AuthenticationError):
        OpenAI(api_key="wrong", base_url=srv.url, max_retries=0).models.list()
    for base in (srv.url, srv.url + "/v1"):
        c = OpenAI(api_key="sekrit", base_url=base, max_retries=0, _strict_response_validation=True)
        assert c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=2).choices[0].message.content


def test_health_503_while_loading(server_loop, engine):
    gate = threading.Event()

    def slow_factory():
        gate.wait(30)
        return engine
    srv = start_app(server_loop, engine_factory=slow_factory)
    try:
        r = http(srv.port, "GET", "/health")
        assert r.status == 503 and r.json()["error"]["message"] == "Loading model"
        r = http(srv.port, "POST", "/v1/chat/completions", _chat(max_tokens=2))
        assert r.status == 503 and "retry-after" in r.headers
        assert http(srv.port, "GET", "/metrics").status == 200
        gate.set()
        deadline = time.monotonic() + 10
        while http(srv.port, "GET", "/health").status != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert http(srv.port, "GET", "/health").json() == {"status": "ok"}
        assert http(srv.port, "POST", "/v1/chat/completions", _chat(max_tokens=2)).status == 200
    finally:
        gate.set()
        srv.stop()


def test_metrics_exposition(server):
    http(server.port, "POST", "/v1/chat/completions", _chat(max_tokens=3))
    r = http(server.port, "GET", "/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.body.decode()
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    for name in ("lamina:num_requests_running", "lamina:num_requests_waiting", "lamina:kv_cache_usage_perc"):
        assert types[name] == "gauge"
    for name in ("lamina:prompt_tokens_total", "lamina:generation_tokens_total", "lamina:prefix_cache_hits_total",
                 "lamina:prefix_cache_queries_total", "lamina:num_preemptions_total",
                 "lamina:request_success_total"):
        assert types[name] == "counter"
    for name in ("lamina:time_to_first_token_seconds", "lamina:inter_token_latency_seconds",
                 "lamina:e2e_request_latency_seconds"):
        assert types[name] == "histogram"
    for line in text.splitlines():  # every sample line: name{labels} value
        if not line.startswith("#"):
            assert re.fullmatch(r'lamina:[a-z0-9_]+\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\} [-+0-9.eInf]+', line), line
    m = metrics(server.port)
    assert metric(m, "lamina:generation_tokens_total") >= 3
    assert metric(m, "lamina:request_success_total", finished_reason="length") >= 1
    buckets = [v for k, v in m.items() if k.startswith("lamina:time_to_first_token_seconds_bucket")]
    assert buckets == sorted(buckets) and buckets[-1] == metric(m, "lamina:time_to_first_token_seconds_count") > 0
    # a second identical chat turn hits the prefix cache
    hits = metric(m, "lamina:prefix_cache_hits_total")
    r = http(server.port, "POST", "/v1/chat/completions", _chat(max_tokens=1)).json()
    assert r["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert metric(metrics(server.port), "lamina:prefix_cache_hits_total") > hits


def test_graceful_shutdown_lets_streams_finish(make_server):
    srv = make_server(shutdown_timeout=30)
    c = Conn(srv.port)
    c.send(request_bytes("POST", "/chat/completions", json.dumps(_chat(max_tokens=20, stream=True,
                                                                         ignore_eos=True)).encode()))
    head = c.read_response(head_only=True)
    assert head.status == 200
    stopper = threading.Thread(target=srv.stop, kwargs={"timeout": 30})
    stopper.start()
    time.sleep(0.3)
    with pytest.raises(OSError):  # no longer accepting
        socket.create_connection(("127.0.0.1", srv.port), timeout=2).recv(1)
    # the in-flight stream still completes, well-formed (chunked body read by hand)
    c.buf = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + c.buf
    body = c.read_response().body
    events = sse_events(body)[:-1]
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    stopper.join(30)
    assert not stopper.is_alive()
    c.close()


def test_lamina_serve_subprocess_sigterm(tmp_path, default_model_dir):
    """`lamina serve` prints its URL and the example, serves, and on SIGTERM finishes the
    in-flight stream, then exits 0."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lamina", "serve", "--model", default_model_dir, "--port", "0",
         "--served-model-name", MODEL, "--max-model-len", "512", "--kv-cache-memory", "64MiB",
         "--shutdown-timeout", "30"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=os.getcwd())
    try:
        out_lines = []
        url = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, f"server exited early: {proc.stderr.read()}"
            out_lines.append(line)
            m = re.search(r"at (http://127\.0\.0\.1:\d+)", line)
            url = url or (m and m.group(1))
            if "<end-of-stream>" in line:
                break
        banner = "".join(out_lines)
        assert url and f'base_url="{url}"' in banner and 'model="smollm2-135m-instruct"' in banner
        port = int(url.rsplit(":", 1)[1])
        c = Conn(port)
        c.send(request_bytes("POST", "/v1/chat/completions",
                             json.dumps(_chat(max_tokens=24, stream=True, ignore_eos=True)).encode()))
        assert c.read_response(head_only=True).status == 200
        proc.send_signal(signal.SIGTERM)
        c.buf = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + c.buf
        events = sse_events(c.read_response().body)[:-1]
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(60) == 0
        err = proc.stderr.read()
        assert '"POST /v1/chat/completions HTTP/1.1" 200' in err  # the access log line
        assert "completion=24" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_args_defaults():
    from lamina.cli import build_parser
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.model) == ("127.0.0.1", 8000, "smollm2-135m-instruct")
    assert args.api_key is None and args.served_model_name is None
    args = build_parser().parse_args(["serve", "--served-model-name", "a", "b", "--api-key", "k"])
    assert args.served_model_name == ["a", "b"] and args.api_key == "k"


def test_bench_serve_smoke(server, tmp_path):
    """bench/serve.py runs a small sweep against the server and writes its JSON."""
    import importlib.util
    path = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "serve.py")
    spec = importlib.util.spec_from_file_location("bench_serve", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_serve"] = bench  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    out = tmp_path / "serve.json"
    rc = bench.main(["--base-url", server.url + "/v1", "--levels", "1,2", "--num-requests", "2", "--max-tokens", "4",
                     "--prompt-words", "10", "--out", str(out)])
    assert rc == 0
    results = json.loads(out.read_text())
    assert results["model"] == MODEL and [lv["concurrency"] for lv in results["levels"]] == [1, 2]
    for lv in results["levels"]:
        assert lv["completed"] == 2 and lv["errors"] == 0 and lv["output_tokens"] == 8
        assert lv["ttft_s"]["p50"] > 0 and lv["itl_s"]["p99"] >= lv["itl_s"]["p50"] > 0
        assert lv["output_tokens_per_s"] > 0
        assert lv["health_s"]["max"] >= lv["health_s"]["p50"] > 0  # /health answered while it ran
