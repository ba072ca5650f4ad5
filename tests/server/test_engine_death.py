"""A request's failure fails that request alone; an engine that cannot go on ends the server with
exit code 1 (a supervisor restarts it) instead of leaving it answering 503 for ever."""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from lamina.config import EngineConfig
from lamina.engine.async_engine import AsyncEngine
from lamina.server.app import ServerSettings
from lamina.server.launch import serve
from tests.utils import save_tiny_hf_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, path: str, body: dict, timeout: float = 60) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _wait_healthy(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.1)
    raise TimeoutError("the server never became healthy")


@pytest.mark.breaks_steps
def test_server_fails_one_request_then_exits_when_the_engine_dies(tmp_path):
    save_tiny_hf_model(tmp_path, max_position_embeddings=256)
    engines: list[AsyncEngine] = []

    def factory():
        engines.append(AsyncEngine(EngineConfig(model=str(tmp_path), dtype="float32", kv_cache_memory=16 << 20)))
        return engines[-1]

    port = _free_port()
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault(
        "code", asyncio.run(serve(ServerSettings(port=port, served_model_names=["tiny"]), factory))), daemon=True)
    thread.start()
    _wait_healthy(port, time.monotonic() + 120)
    engine = engines[0]
    request = {"model": "tiny", "prompt": "hello", "max_tokens": 4, "temperature": 0}

    # one request breaks inside a step (what a validation gap would let through): it alone fails
    original = engine.engine.add_request

    def add_and_break(request_id, prompt, params=None, **kw):
        rid = original(request_id, prompt, params, **kw)
        if params.seed == 666:
            for seq in engine.engine.requests[rid].seqs:
                seq.params.top_k = 2 ** 64
        return rid

    engine.engine.add_request = add_and_break
    status, body = _post(port, "/v1/completions", {**request, "temperature": 0.7, "seed": 666})
    assert status == 500 and "failed while serving this request" in body["error"]["message"]
    assert "top_k" not in body["error"]["message"] and "Traceback" not in json.dumps(body)
    status, body = _post(port, "/v1/completions", request)
    assert status == 200 and body["choices"][0]["finish_reason"] == "length"

    # a failure outside any one request: the engine cannot go on, so the server ends with code 1
    def broken():
        raise RuntimeError("the scheduler broke")

    engine.engine.scheduler.schedule = broken
    status, body = _post(port, "/v1/completions", request)
    assert status == 503
    thread.join(60)
    assert not thread.is_alive() and result["code"] == 1
    with socket.socket() as s:   # the port is closed
        assert s.connect_ex(("127.0.0.1", port)) != 0
